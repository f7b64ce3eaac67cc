//! Message content: the strict DATA receiver, the BDAT line-ending check, and the outbound
//! dot-stuffing writer. Our own small components, because smtp-proto 0.2.5's receiver and
//! mail-send 0.7.0's writer do not meet SPEC section 5.3 (see docs/smtp.md).
//!
//! Rules enforced (RFC 5321 sections 2.3.8, 4.1.1.4, 4.5.2):
//! - Lines end with CRLF only. A bare CR or bare LF anywhere is an error (SMTP smuggling
//!   defence): the caller answers `550 5.6.11` and closes the connection. So is a NUL octet
//!   (no BINARYMIME is offered): a downstream that strips NULs would otherwise see
//!   `CRLF NUL . CRLF` as an end of data the relay did not.
//! - End of data is `CRLF . CRLF`, where the CRLF before the dot may be the implicit one before
//!   the first byte after `354` (a lone `.` on the first line ends an empty message).
//! - A leading dot is removed from every line that has one, the first line included.
//! - The content kept is exactly the lines received, each with its CRLF.

use memchr::{memchr2, memchr3};

/// What happened to the bytes fed so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataStatus {
    /// All input consumed; the end of data has not been seen yet.
    NeedMore,
    /// The end-of-data line was consumed; bytes after it belong to the next command.
    Complete,
    /// A bare CR or LF, or a NUL, was found; the session must be closed.
    BareLineEnding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line (also right after `354`).
    LineStart,
    /// A dot at the start of a line.
    Dot,
    /// `.` CR at the start of a line: the end, if LF follows.
    DotCr,
    /// Inside a line.
    Mid,
    /// A CR inside or at the end of a line: LF must follow.
    Cr,
}

/// Receives the content of one DATA transaction.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    max_size: usize,
    size: usize,
    oversize: bool,
    /// Read on to the end but keep nothing more (the memory budget is spent).
    discarding: bool,
}

impl DataReceiver {
    /// A receiver keeping at most `max_size` octets of content.
    pub fn new(max_size: usize) -> Self {
        Self {
            state: State::LineStart,
            max_size,
            size: 0,
            oversize: false,
            discarding: false,
        }
    }

    /// From now on the content is read to its end but not kept.
    pub fn discard(&mut self) {
        self.discarding = true;
    }

    /// Whether the content exceeded the maximum size (it was read to the end but not kept).
    pub fn is_oversize(&self) -> bool {
        self.oversize
    }

    /// Octets of content received (counted even past the maximum).
    pub fn size(&self) -> usize {
        self.size
    }

    fn keep(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size += bytes.len();
        if self.oversize || self.discarding {
            return;
        }
        if self.size > self.max_size {
            self.oversize = true;
            out.clear();
            out.shrink_to_fit();
        } else {
            out.extend_from_slice(bytes);
        }
    }

    /// Feeds input, appending content to `out`. Returns how many bytes were consumed and the
    /// status; bytes past the end of data are left unconsumed for the command reader.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Mid => match memchr3(b'\r', b'\n', 0, &input[i..]) {
                    None => {
                        self.keep(&input[i..], out);
                        i = input.len();
                    }
                    Some(k) => {
                        self.keep(&input[i..i + k], out);
                        i += k;
                        if input[i] != b'\r' {
                            return (i + 1, DataStatus::BareLineEnding);
                        }
                        self.state = State::Cr;
                        i += 1;
                    }
                },
                State::Cr => {
                    if input[i] != b'\n' {
                        return (i, DataStatus::BareLineEnding);
                    }
                    self.keep(b"\r\n", out);
                    self.state = State::LineStart;
                    i += 1;
                }
                State::LineStart => match input[i] {
                    b'.' => {
                        self.state = State::Dot;
                        i += 1;
                    }
                    b'\r' => {
                        self.state = State::Cr;
                        i += 1;
                    }
                    b'\n' | 0 => return (i + 1, DataStatus::BareLineEnding),
                    _ => self.state = State::Mid,
                },
                State::Dot => match input[i] {
                    b'\r' => {
                        self.state = State::DotCr;
                        i += 1;
                    }
                    b'\n' | 0 => return (i + 1, DataStatus::BareLineEnding),
                    // The leading dot is dropped; what follows it is content.
                    _ => self.state = State::Mid,
                },
                State::DotCr => {
                    if input[i] != b'\n' {
                        return (i, DataStatus::BareLineEnding);
                    }
                    return (i + 1, DataStatus::Complete);
                }
            }
        }
        (i, DataStatus::NeedMore)
    }
}

/// Checks BDAT chunks for bare CR, bare LF and NUL, across chunk boundaries (a chunk may end
/// between the CR and the LF of one line ending).
#[derive(Debug, Default)]
pub struct BdatChecker {
    after_cr: bool,
}

impl BdatChecker {
    /// Checks one chunk; false when it holds a bare CR or LF, or a NUL.
    pub fn check(&mut self, chunk: &[u8]) -> bool {
        if memchr::memchr(0, chunk).is_some() {
            return false;
        }
        let mut i = 0;
        if self.after_cr {
            match chunk.first() {
                None => return true,
                Some(b'\n') => i = 1,
                Some(_) => return false,
            }
            self.after_cr = false;
        }
        while let Some(k) = memchr2(b'\r', b'\n', &chunk[i..]) {
            let at = i + k;
            if chunk[at] == b'\n' {
                return false;
            }
            match chunk.get(at + 1) {
                Some(b'\n') => i = at + 2,
                Some(_) => return false,
                None => {
                    self.after_cr = true;
                    return true;
                }
            }
        }
        true
    }

    /// After the last chunk: false when the content ended with a bare CR.
    pub fn finish(&self) -> bool {
        !self.after_cr
    }
}

pub use mailroute_smtp_client::dot::{DotStuffer, dot_stuff};

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in the given pieces; returns (status, consumed, content).
    fn run(pieces: &[&[u8]], max: usize) -> (DataStatus, usize, Vec<u8>, bool) {
        let mut rx = DataReceiver::new(max);
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            let (n, status) = rx.feed(piece, &mut out);
            consumed += n;
            if status != DataStatus::NeedMore {
                return (status, consumed, out, rx.is_oversize());
            }
            assert_eq!(n, piece.len(), "NeedMore must consume everything");
        }
        (DataStatus::NeedMore, consumed, out, rx.is_oversize())
    }

    /// The same outcome in one write, byte by byte, and split at every offset.
    fn all_segmentations(input: &[u8]) -> (DataStatus, usize, Vec<u8>) {
        let (status, consumed, content, _) = run(&[input], usize::MAX);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let one_by_one = run(&bytes, usize::MAX);
        assert_eq!(
            (one_by_one.0, one_by_one.1, &one_by_one.2),
            (status, consumed, &content),
            "byte by byte"
        );
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            let r = run(&[a, b], usize::MAX);
            assert_eq!(
                (r.0, r.1, &r.2),
                (status, consumed, &content),
                "split at {split}"
            );
        }
        (status, consumed, content)
    }

    #[test]
    fn a_plain_message_ends_at_crlf_dot_crlf_and_keeps_its_lines() {
        let input = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n";
        let (status, consumed, content) = all_segmentations(input);
        assert_eq!(status, DataStatus::Complete);
        assert_eq!(&input[consumed..], b"QUIT\r\n");
        assert_eq!(content, b"Subject: hi\r\n\r\nbody\r\n");
    }

    #[test]
    fn a_dot_alone_on_the_first_line_ends_an_empty_message() {
        let (status, consumed, content) = all_segmentations(b".\r\nMAIL FROM:<a@b>\r\n");
        assert_eq!(
            (status, consumed, content.as_slice()),
            (DataStatus::Complete, 3, &b""[..])
        );
    }

    #[test]
    fn leading_dots_are_removed_on_every_line_including_the_first() {
        let (status, _, content) =
            all_segmentations(b"..first\r\nx\r\n..\r\n...third\r\n.x\r\n.\r\n");
        assert_eq!(status, DataStatus::Complete);
        assert_eq!(content, b".first\r\nx\r\n.\r\n..third\r\nx\r\n");
    }

    #[test]
    fn smuggling_variants_never_end_the_data_and_are_refused() {
        for variant in crate::smtp::fuzzing::SMUGGLING_VARIANTS {
            let mut input = b"From: a@example.com\r\n\r\nhello".to_vec();
            input.extend_from_slice(variant);
            input.extend_from_slice(b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
            let (status, _, content) = all_segmentations(&input);
            assert_eq!(status, DataStatus::BareLineEnding, "variant {variant:?}");
            assert!(
                !content.windows(8).any(|w| w == b"smuggled"),
                "variant {variant:?}"
            );
        }
    }

    #[test]
    fn a_nul_anywhere_is_refused_like_a_bare_line_ending() {
        for input in [
            &b"hello\r\n\x00.\r\nMAIL FROM:<evil@example.com>\r\n.\r\n"[..],
            b"hello\r\n.\x00\r\n.\r\n",
            b"\x00\r\n.\r\n",
            b"mid\x00line\r\n.\r\n",
        ] {
            let (status, _, content) = all_segmentations(input);
            assert_eq!(status, DataStatus::BareLineEnding, "{input:?}");
            assert!(!content.contains(&0), "{input:?}");
        }
        let mut c = BdatChecker::default();
        assert!(!c.check(b"hello\r\n\x00.\r\n"));
    }

    #[test]
    fn oversize_content_is_read_to_the_end_but_not_kept() {
        let (status, consumed, content, oversize) =
            run(&[b"0123456789\r\n0123456789\r\n.\r\nQUIT\r\n"], 16);
        assert_eq!(
            (status, consumed, oversize),
            (DataStatus::Complete, 27, true)
        );
        assert!(content.is_empty());
        let (_, _, content, oversize) = run(&[b"0123456789\r\n0123\r\n.\r\n"], 18);
        assert!(!oversize);
        assert_eq!(content.len(), 18);
    }

    #[test]
    fn bdat_refuses_bare_endings_across_chunk_boundaries() {
        let ok: &[&[&[u8]]] = &[
            &[b"a\r\nb\r\n"],
            &[b"a\r", b"\nb\r\n"],
            &[b"a\r", b"", b"\n"],
            &[b"a.\r\n.\r\n"],
        ];
        for chunks in ok {
            let mut c = BdatChecker::default();
            assert!(
                chunks.iter().all(|k| c.check(k)) && c.finish(),
                "{chunks:?}"
            );
        }
        let bad: &[&[&[u8]]] = &[
            &[b"a\nb"],
            &[b"a\rb"],
            &[b"a\r", b"b"],
            &[b"a\r"],
            &[b"\n"],
            &[b"a\r\n", b"\r\r\n"],
        ];
        for chunks in bad {
            let mut c = BdatChecker::default();
            assert!(
                !(chunks.iter().all(|k| c.check(k)) && c.finish()),
                "{chunks:?}"
            );
        }
    }

    #[test]
    fn dot_stuffing_round_trips_through_the_receiver_byte_for_byte() {
        let messages: &[&[u8]] = &[
            b"",
            b".\r\n",
            b"..\r\n",
            b".first\r\n.\r\n..\r\nend\r\n",
            b"Subject: x\r\n\r\n\xc3\xa9t\xc3\xa9 8-bit\r\n",
            b"no final crlf",
        ];
        for message in messages {
            let mut wire = Vec::new();
            dot_stuff(message, &mut wire);
            let (status, consumed, content) = all_segmentations(&wire);
            assert_eq!(
                (status, consumed),
                (DataStatus::Complete, wire.len()),
                "{message:?}"
            );
            let mut expected = message.to_vec();
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            assert_eq!(content, expected, "{message:?}");
        }
        let mut wire = Vec::new();
        dot_stuff(b".a\r\nb\r\n.c\r\n", &mut wire);
        assert_eq!(wire, b"..a\r\nb\r\n..c\r\n.\r\n");
    }

    #[test]
    fn long_lines_are_content() {
        let mut input = vec![b'x'; 998];
        input.extend_from_slice(b"\r\n");
        input.extend(std::iter::repeat_n(b'y', 5000));
        input.extend_from_slice(b"\r\n.\r\n");
        let (status, _, content, _) = run(&[&input], usize::MAX);
        assert_eq!(status, DataStatus::Complete);
        assert_eq!(content.len(), 998 + 2 + 5000 + 2);
    }
}
