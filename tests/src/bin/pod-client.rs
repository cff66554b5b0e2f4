//! The pod client application for the end-to-end tests (see
//! `ambient_agent::demo::client`): `pod-client ADDR LEN SEED`.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, len, seed] = args.as_slice() else {
        anyhow::bail!("usage: pod-client ADDR LEN SEED");
    };
    ambient_agent::demo::client::main(
        addr.parse().context("ADDR")?,
        len.parse().context("LEN")?,
        seed.parse().context("SEED")?,
    )
}
