//! The process's malloc, tuned for a long-lived operator whose memory is mostly a few large
//! structures built at once (a run's plan) and many short-lived buffers.

/// One malloc arena for the whole process. glibc gives each thread that allocates its own
/// arena, and an arena keeps the peak of the transient buffers made in it (a manifest
/// shard rendered, a list response parsed) long after they are freed: in a 1,000-instance
/// run, two runtime threads' arenas held 25 of the 33 MiB of anonymous memory. The price
/// is contention on one arena; the operator waits on the API server far more than it
/// allocates. Call first thing in `main`, before any other thread starts.
pub fn one_arena() {
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the pages of freed memory back to the system. Building a large plan frees as much
/// as it keeps (the instance list as read, templates' intermediate text): without this, the
/// process keeps that peak as resident memory, however little it then holds.
pub fn give_back() {
    // SAFETY: malloc_trim only walks malloc's own free lists and advises the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
