//! A session's output as a byte stream with absolute offsets, keeping only
//! the newest bytes; and where to cut it so UTF-8 characters stay whole.

use std::collections::VecDeque;

/// The last `capacity` bytes of an output stream. Offsets count every byte
/// ever pushed, so a reader can tell exactly what it missed.
#[derive(Debug)]
pub struct OutputRing {
    buf: VecDeque<u8>,
    start: u64,
    capacity: usize,
}

impl OutputRing {
    /// An empty ring holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(capacity.min(64 * 1024)),
            start: 0,
            capacity,
        }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&mut self, bytes: &[u8]) {
        self.push_with(bytes, |_| {});
    }

    /// Appends bytes; the oldest bytes that no longer fit are shown to
    /// `dropped`, in order, before they go.
    pub fn push_with(&mut self, bytes: &[u8], mut dropped: impl FnMut(&[u8])) {
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.capacity);
        let from_buf = overflow.min(self.buf.len());
        let (a, b) = self.buf.as_slices();
        dropped(&a[..from_buf.min(a.len())]);
        dropped(&b[..from_buf.saturating_sub(a.len())]);
        self.buf.drain(..from_buf);
        let from_bytes = overflow - from_buf;
        dropped(&bytes[..from_bytes]);
        self.buf.extend(&bytes[from_bytes..]);
        self.start += overflow as u64;
    }

    /// Every byte held, oldest first.
    pub fn contents(&self) -> (&[u8], &[u8]) {
        self.buf.as_slices()
    }

    /// Most bytes held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Offset of the oldest byte still held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Offset just past the newest byte.
    pub fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Up to `max` bytes from `offset` (or from the oldest byte held, if
    /// `offset` was dropped), with the offset they really start at.
    pub fn read(&self, offset: u64, max: usize) -> (u64, Vec<u8>) {
        let from = offset.clamp(self.start, self.end());
        let skip = (from - self.start) as usize;
        let take = max.min(self.buf.len() - skip);
        let (a, b) = self.buf.as_slices();
        let mut bytes = Vec::with_capacity(take);
        let in_a = a.len().saturating_sub(skip).min(take);
        bytes.extend_from_slice(&a[skip.min(a.len())..skip.min(a.len()) + in_a]);
        let b_start = skip.saturating_sub(a.len());
        bytes.extend_from_slice(&b[b_start..b_start + (take - in_a)]);
        (from, bytes)
    }
}

/// How much of `bytes` to send now as one message, and whether it is text.
///
/// - valid UTF-8: all of it, as text;
/// - valid text followed by something else: the text first;
/// - invalid bytes first: those bytes, as binary;
/// - only the start of a character that may yet be completed: nothing,
///   unless `force` (then as binary).
pub fn utf8_cut(bytes: &[u8], force: bool) -> (usize, bool) {
    match std::str::from_utf8(bytes) {
        Ok(_) => (bytes.len(), true),
        Err(err) if err.valid_up_to() > 0 => (err.valid_up_to(), true),
        Err(err) => match err.error_len() {
            Some(invalid) => (invalid, false),
            None if force => (bytes.len(), false),
            None => (0, true),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes_with_absolute_offsets() {
        let mut ring = OutputRing::new(8);
        ring.push(b"abcdef");
        ring.push(b"ghij");
        assert_eq!((ring.start(), ring.end()), (2, 10));
        assert_eq!(ring.read(0, 100), (2, b"cdefghij".to_vec()));
        assert_eq!(ring.read(5, 2), (5, b"fg".to_vec()));
        assert_eq!(ring.read(10, 2), (10, Vec::new()));
        ring.push(&[b'x'; 20]);
        assert_eq!((ring.start(), ring.end()), (22, 30));
        assert_eq!(ring.read(0, 100).1, vec![b'x'; 8]);
    }

    #[test]
    fn reads_across_the_wrap_point() {
        let mut ring = OutputRing::new(6);
        ring.push(b"abcdef");
        ring.push(b"gh"); // the deque wraps: "cdef" then "gh"
        for offset in 2..=8 {
            for max in 0..8 {
                let expected: Vec<u8> = b"cdefgh"[(offset - 2) as usize..]
                    .iter()
                    .take(max)
                    .copied()
                    .collect();
                assert_eq!(
                    ring.read(offset, max),
                    (offset, expected),
                    "offset {offset} max {max}"
                );
            }
        }
    }

    #[test]
    fn shows_every_dropped_byte_in_order() {
        let mut ring = OutputRing::new(4);
        let mut gone = Vec::new();
        for chunk in [&b"ab"[..], b"cde", b"fghijk", b"l"] {
            ring.push_with(chunk, |bytes| gone.extend_from_slice(bytes));
        }
        assert_eq!(gone, b"abcdefgh");
        let (a, b) = ring.contents();
        assert_eq!([a, b].concat(), b"ijkl");
        assert_eq!(ring.start(), 8);
    }

    #[test]
    fn cuts_never_split_a_character() {
        let euro = "€".as_bytes(); // e2 82 ac
        assert_eq!(utf8_cut(b"abc", false), (3, true));
        assert_eq!(utf8_cut(&[b'a', euro[0], euro[1]], false), (1, true));
        assert_eq!(utf8_cut(&euro[..2], false), (0, true));
        assert_eq!(utf8_cut(&euro[..2], true), (2, false));
        assert_eq!(utf8_cut(&[0xff, 0xfe, b'a'], false), (1, false));
        assert_eq!(utf8_cut(&[b'a', 0xff], false), (1, true));
    }
}
