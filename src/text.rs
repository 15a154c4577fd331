//! Text cut to a size: every message the operator sends (conditions, Events, records,
//! quoted values) is bounded, cut on a character boundary with `...` where it was cut.

/// `text` cut to at most `max` bytes (on a character boundary), keeping the end, where
/// build errors are.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max + 3;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// `text` cut to at most `max` bytes (plus `...`) on a character boundary, keeping its
/// start; [`shorten`] keeps the end instead.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_keep_their_end() {
        let text = format!("{}THE END", "x".repeat(2000));
        let short = shorten(&text, 100);
        assert_eq!(short.len(), 100);
        assert!(short.ends_with("THE END") && short.starts_with("..."));
    }

    #[test]
    fn long_values_keep_their_start_on_a_character_boundary() {
        assert_eq!(truncate("abcdef", 4), "abcd...");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(truncate("aüb", 2), "a...");
    }
}
