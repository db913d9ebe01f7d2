//! `run`'s network options (`--network`, `--allow`, `--deny`, `--host-loopback`) as a
//! [`Network`].
//!
//! The rules keep their order on the command line only within each option: clap collects
//! `--allow` and `--deny` separately, so all deny rules come first and the allow rules after
//! them. That order loses nothing: an allow rule beats every deny rule wherever it stands.

use supermachine::Network;

use crate::cli::RunArgs;
use crate::failure::Failure;

/// The network `args` asks for; a bad value or rule is a one-line failure.
pub fn from_args(args: &RunArgs) -> Result<Network, Failure> {
    let mut network = match args.network.as_str() {
        "public" => Network::public(),
        "none" => {
            if !(args.allow.is_empty() && args.deny.is_empty() && args.host_loopback.is_empty()) {
                return Err(Failure::new(
                    "--network none has no NIC: --allow, --deny and --host-loopback need \
                     --network public",
                ));
            }
            return Ok(Network::none());
        }
        other => {
            return Err(Failure::new(format!(
                "--network {other:?}: expected `none` or `public`"
            )))
        }
    };
    for rule in &args.deny {
        network = network.deny(rule)?;
    }
    for rule in &args.allow {
        network = network.allow(rule)?;
    }
    if args.host_loopback.contains(&0) {
        return Err(Failure::new("--host-loopback 0: not a port"));
    }
    Ok(network.host_loopback(args.host_loopback.iter().copied()))
}
