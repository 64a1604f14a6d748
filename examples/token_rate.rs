//! Raw signing rate of a token key: C_Sign over a 1 KiB message in a loop, on 1..=N sessions,
//! for the benchmark's baseline (softhsm/bench.sh). Uses HSMCA_PIN and SOFTHSM2_CONF.
//!
//! usage: token_rate MODULE TOKEN KEY_LABEL SECONDS SESSIONS
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "a benchmark tool")]

use std::time::{Duration, Instant};

use hsmca::signer::CaSigner;
use hsmca::token::{Token, TokenRef};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, module, token, label, secs, sessions] = args.as_slice() else {
        panic!("usage: token_rate MODULE TOKEN KEY_LABEL SECONDS SESSIONS");
    };
    let pin = hsmca::pin::read(None, token).unwrap();
    let token = Token::open(module.as_ref(), &TokenRef::parse(token).unwrap(), &pin).unwrap();
    let public = token.key(label).unwrap().public_key().clone();
    let mut workers = token
        .workers(label, &public, sessions.parse().unwrap())
        .unwrap();
    let limit = Duration::from_secs(secs.parse().unwrap());
    let message = vec![0x5a; 1024];
    let start = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|w| {
                let message = &message;
                scope.spawn(move || {
                    let mut n = 0u64;
                    while start.elapsed() < limit {
                        w.sign(message).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!("{:.0}", total as f64 / start.elapsed().as_secs_f64());
}
