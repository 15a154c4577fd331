//! The process's allocator, chosen for a long-lived operator whose memory is mostly a few
//! large structures built at once (a run's plan) and many short-lived buffers (watch
//! events decoded, requests and responses).
//!
//! With the `jemalloc` feature (the default) the operator binary allocates with jemalloc
//! ([`Allocator`], set as its global allocator in `main`): at 10,000 instances it spent
//! less CPU than glibc's malloc for the same work (docs/architecture.md, Watches, wakes
//! and memory). Without it, the system's malloc: on glibc, held to one arena ([`tune`]).

/// The operator binary's global allocator.
#[cfg(feature = "jemalloc")]
pub type Allocator = tikv_jemallocator::Jemalloc;

/// Sets the allocator up; call first thing in `main`, before any other thread starts.
///
/// jemalloc needs nothing. glibc's malloc is held to one arena: it gives each thread that
/// allocates an arena of its own, and an arena keeps the peak of the transient buffers
/// made in it (a manifest shard rendered, a list response parsed) long after they are
/// freed (in a 1,000-instance run, on the two-thread runtime the operator then had, two
/// runtime threads' arenas held 25 of the 33 MiB of anonymous memory).
pub fn tune() {
    #[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the pages of freed memory back to the system at once. Building a large plan frees
/// as much as it keeps (the instance list as read, templates' intermediate text): without
/// this, the process keeps that peak resident until the allocator would return it of its
/// own accord (jemalloc: after its decay time, and only while it allocates; glibc: never
/// from the middle of a heap).
pub fn give_back() {
    #[cfg(feature = "jemalloc")]
    // SAFETY: `arena.<MALLCTL_ARENAS_ALL>.purge` takes and returns nothing; the name is a
    // NUL-terminated string that lives for the call.
    unsafe {
        // 4096 is MALLCTL_ARENAS_ALL: every arena. The answer (0, or an error number) is
        // not acted on: the purge is advice.
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists and advises the kernel. (With
    // jemalloc too: what C code allocates still comes from malloc.)
    unsafe {
        libc::malloc_trim(0);
    }
}
