//! Stop strings over streamed text.
//!
//! Text arrives in pieces (one detokenized token at a time), so a stop string may be split
//! over several pieces. [`StopMatcher`] holds back the longest tail of the text that could
//! still become a stop string and releases it once it cannot, so no part of a stop string
//! is ever emitted.
//!
//! ```text
//! stops = ["###"]      push("a#")  -> emit "a",   hold "#"
//!                      push("#b")  -> emit "##b", hold ""      ("##b" is no prefix of "###")
//!                      push("x##") -> emit "x",   hold "##"
//!                      push("#c")  -> emit "",    stopped "###" (the "c" is dropped)
//! ```
//!
//! When several stop strings occur, the one that is completed first (smallest end
//! position; on a tie the longer one) wins, so the result does not depend on how the text
//! was cut into pieces.

/// What one [`StopMatcher::push`] releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopPush {
    /// Text safe to send to the client.
    pub emit: String,
    /// The stop string found, if any; generation ends here and `emit` is the text before it.
    pub stopped: Option<String>,
}

/// Per-request matcher of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes.
    max_len: usize,
    /// Held-back tail: a prefix of some stop string.
    held: String,
    done: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher { stops, max_len, held: String::new(), done: false }
    }

    /// Whether a stop string has been found (later pushes return nothing).
    pub fn is_stopped(&self) -> bool {
        self.done
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> StopPush {
        if self.done {
            return StopPush::default();
        }
        if self.stops.is_empty() {
            return StopPush { emit: text.to_string(), stopped: None };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        // (end, start, stop index) of the first completed stop string.
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| buf.find(s.as_str()).map(|start| (start + s.len(), start, i)))
            .min_by_key(|&(end, start, _)| (end, start));
        if let Some((_, start, i)) = found {
            self.done = true;
            buf.truncate(start);
            return StopPush { emit: buf, stopped: Some(self.stops[i].clone()) };
        }
        let keep = self.partial_suffix_len(&buf);
        self.held = buf.split_off(buf.len() - keep);
        StopPush { emit: buf, stopped: None }
    }

    /// Releases the held-back text (at the end of generation). Empty after a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `buf` that is a proper prefix of a stop
    /// string (always on a char boundary).
    fn partial_suffix_len(&self, buf: &str) -> usize {
        let longest = buf.len().min(self.max_len.saturating_sub(1));
        (1..=longest)
            .rev()
            .filter(|&k| buf.is_char_boundary(buf.len() - k))
            .find(|&k| {
                let tail = &buf[buf.len() - k..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopMatcher {
        StopMatcher::new(list.iter().map(|s| s.to_string()).collect())
    }

    /// Feeds `pieces`; returns everything emitted (plus the flush if no stop) and the stop.
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.emit);
            if r.stopped.is_some() {
                return (out, r.stopped);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_split_over_many_pushes_is_found_and_never_partly_emitted() {
        let mut m = stops(&["</answer>"]);
        let pieces = ["The answer is 42", "<", "/", "ans", "wer", ">", " and more"];
        let mut emitted = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let r = m.push(p);
            emitted.push_str(&r.emit);
            assert!(!emitted.contains('<'), "part of the stop string leaked: {emitted:?}");
            if i == 5 {
                assert_eq!(r.stopped.as_deref(), Some("</answer>"));
            }
        }
        assert_eq!(emitted, "The answer is 42");
        assert!(m.is_stopped());
        assert_eq!(m.flush(), "");
        assert_eq!(m.push("late").emit, "");
    }

    #[test]
    fn false_start_is_released_once_it_cannot_match() {
        let mut m = stops(&["###"]);
        assert_eq!(m.push("a#").emit, "a");
        assert_eq!(m.push("#b").emit, "##b");
        assert_eq!(m.push("x##").emit, "x");
        let r = m.push("#c");
        assert_eq!((r.emit.as_str(), r.stopped.as_deref()), ("", Some("###")));
    }

    #[test]
    fn overlapping_stops_first_completed_wins_whatever_the_chunking() {
        for pieces in [vec!["abcd"], vec!["a", "b", "c", "d"], vec!["ab", "cd"]] {
            let mut m = stops(&["abcd", "bc"]);
            assert_eq!(run(&mut m, &pieces), ("a".to_string(), Some("bc".to_string())), "{pieces:?}");
        }
        // Same end: the longer (earlier starting) one.
        let mut m = stops(&["c", "abc"]);
        assert_eq!(run(&mut m, &["xab", "cy"]), ("x".to_string(), Some("abc".to_string())));
        // A stop that is a prefix of another.
        let mut m = stops(&["User:", "User"]);
        assert_eq!(run(&mut m, &["hi Us", "er"]), ("hi ".to_string(), Some("User".to_string())));
    }

    #[test]
    fn text_without_stop_passes_through_unchanged_when_flushed() {
        let text = ["Hello", " wor", "ld", "!", " <", "end"];
        let mut m = stops(&["<end>", "STOP"]);
        assert_eq!(run(&mut m, &text), (text.concat(), None));
        let mut none = StopMatcher::new(vec![String::new()]);
        assert_eq!(none.push("x").emit, "x");
        assert_eq!(run(&mut StopMatcher::new(Vec::new()), &text), (text.concat(), None));
    }

    #[test]
    fn unicode_stops_and_text_split_on_char_boundaries() {
        let mut m = stops(&["🦀🚀", "日本"]);
        let r = m.push("café 🦀");
        assert_eq!(r.emit, "café ");
        let r = m.push("x 日");
        assert_eq!(r.emit, "🦀x ");
        let r = m.push("本語");
        assert_eq!((r.emit.as_str(), r.stopped.as_deref()), ("", Some("日本")));
        // A held byte prefix inside a multi-byte char never splits the char.
        let mut m = stops(&["é!"]);
        assert_eq!(m.push("naï").emit, "naï");
        assert_eq!(m.push("é").emit, "");
        assert_eq!(m.flush(), "é");
    }
}
