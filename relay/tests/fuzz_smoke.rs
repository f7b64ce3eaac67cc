//! A short, deterministic run of the fuzz harnesses (the long runs use cargo-fuzz, see
//! docs/fuzzing.md): inputs assembled from SMTP tokens and random bytes, so the session
//! reaches DATA, BDAT, AUTH and STARTTLS states.

use mailroute_relay::smtp::fuzzing;

const TOKENS: &[&[u8]] = &[
    b"EHLO client.example\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@example.com>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<a@example.com> SIZE=99999999 BODY=8BITMIME\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 3 LAST\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\n",
    b"YXBw\r\n",
    b"*\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"VRFY x\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r",
    b"\n",
    b".",
    b"\x00",
    b"Received: x\r\n",
    b"Subject: y\r\n",
    b"GET / HTTP/1.1\r\n",
    b"\xff\xfe",
    b"body line\r\n",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn input(rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![rng.next() as u8];
    let parts = rng.next() % 24;
    for _ in 0..parts {
        if rng.next().is_multiple_of(4) {
            let n = rng.next() % 8;
            for _ in 0..n {
                out.push(rng.next() as u8);
            }
        } else {
            out.extend_from_slice(TOKENS[(rng.next() % TOKENS.len() as u64) as usize]);
        }
    }
    if rng.next().is_multiple_of(16) {
        out.extend(std::iter::repeat_n(b'x', 600));
    }
    out
}

#[test]
fn fuzz_harnesses_hold_on_twenty_thousand_inputs_each() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..20_000 {
        let data = input(&mut rng);
        fuzzing::command_line(&data[1..]);
        fuzzing::data_receiver(&data);
        fuzzing::session(&data);
    }
}

#[test]
fn fuzz_harnesses_hold_on_the_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(entry.unwrap_or_else(|e| panic!("{e}")).path())
            .unwrap_or_else(|e| panic!("{e}"));
        fuzzing::command_line(&data);
        fuzzing::data_receiver(&data);
        fuzzing::session(&data);
        seen += 1;
    }
    assert!(seen >= 5, "seed corpus missing");
}
