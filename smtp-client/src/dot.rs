//! Dot transparency on the way out (RFC 5321 4.5.2): content written as DATA exactly as it
//! was received, a dot added before every line that starts with one (the first included),
//! and the end-of-data marker.

/// Appends `message` as DATA content to `out`: a dot is added before every line starting with
/// one (the first line included), a final CRLF is added only if the content lacks one, and the
/// end-of-data line `.` CRLF follows. Lines are otherwise written as received.
pub fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 512 + 5);
    DotStuffer::new(message).fill(out, usize::MAX);
}

/// [`dot_stuff`] a piece at a time, so a large message is written upstream through a small
/// buffer instead of a second whole copy.
#[derive(Debug)]
pub struct DotStuffer<'a> {
    message: &'a [u8],
    pos: usize,
    line_start: bool,
    done: bool,
}

impl<'a> DotStuffer<'a> {
    pub fn new(message: &'a [u8]) -> Self {
        Self {
            message,
            pos: 0,
            line_start: true,
            done: false,
        }
    }

    /// Octets of the message not yet written (before stuffing).
    pub fn remaining(&self) -> usize {
        self.message.len() - self.pos
    }

    /// What ends the data after the message: `.` on a line of its own (with the CRLF a
    /// message that does not end in one needs first).
    pub fn end_marker(&self) -> &'static [u8] {
        if !self.message.is_empty() && !self.message.ends_with(b"\r\n") {
            b"\r\n.\r\n"
        } else {
            b".\r\n"
        }
    }

    /// Like [`fill`](Self::fill), but the end marker is left for the caller to write
    /// ([`end_marker`](Self::end_marker)); true once the message is all out.
    pub fn fill_body(&mut self, out: &mut Vec<u8>, limit: usize) -> bool {
        self.stuff(out, limit);
        self.pos >= self.message.len()
    }

    /// Appends to `out` until it holds about `limit` octets (a line is cut where needed) or the
    /// message and its end marker are all out; true once they are.
    pub fn fill(&mut self, out: &mut Vec<u8>, limit: usize) -> bool {
        self.stuff(out, limit);
        if self.pos < self.message.len() || self.done {
            return self.done;
        }
        out.extend_from_slice(self.end_marker());
        self.done = true;
        true
    }

    fn stuff(&mut self, out: &mut Vec<u8>, limit: usize) {
        let message = self.message;
        while self.pos < message.len() && out.len() < limit {
            if self.line_start && message[self.pos] == b'.' {
                out.push(b'.');
            }
            let rest = &message[self.pos..];
            let line_end = memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1);
            let room = limit.saturating_sub(out.len()).max(1);
            let take = line_end.min(room);
            out.extend_from_slice(&rest[..take]);
            self.pos += take;
            self.line_start = take == line_end && rest[take - 1] == b'\n';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing_a_piece_at_a_time_writes_what_stuffing_at_once_does() {
        let message = b".a\r\nb\r\n.c\r\n..d\r\nlast".repeat(50);
        let mut whole = Vec::new();
        dot_stuff(&message, &mut whole);
        for chunk in [1, 2, 3, 7, 64, 1000] {
            let mut stuffer = DotStuffer::new(&message);
            let mut pieces = Vec::new();
            loop {
                let mut buf = Vec::new();
                let done = stuffer.fill(&mut buf, chunk);
                // At most the end: a CRLF, the end marker and one stuffed dot past the limit.
                assert!(buf.len() <= chunk + 6, "{chunk}: {}", buf.len());
                pieces.extend_from_slice(&buf);
                if done {
                    break;
                }
            }
            assert_eq!(pieces, whole, "chunks of {chunk}");
        }
    }
}
