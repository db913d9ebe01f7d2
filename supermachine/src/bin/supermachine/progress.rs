//! Pull progress on stderr: a bar per layer on a terminal, a line per finished layer otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use supermachine::{PullEvent, PullOptions};

/// `options` with a progress display attached; the returned handle clears it when dropped.
pub fn attach(options: PullOptions) -> (PullOptions, Display) {
    let interactive = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if interactive {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let bars: Arc<Mutex<HashMap<String, ProgressBar>>> = Arc::default();
    let display = Display {
        multi: multi.clone(),
    };
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    let options = options.on_progress(move |event| {
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            PullEvent::Resolved {
                manifest_digest,
                layers,
                total_bytes,
                ..
            } => {
                let line = format!(
                    "{}: {layers} layers, {}",
                    short(manifest_digest),
                    human_bytes(*total_bytes)
                );
                if interactive {
                    let _ = multi.println(line);
                } else {
                    eprintln!("{line}");
                }
            }
            PullEvent::LayerStarted { digest, size, .. } => {
                let bar = multi.add(ProgressBar::new(*size));
                bar.set_style(style.clone());
                bar.set_prefix(short(digest));
                bars.insert(digest.clone(), bar);
            }
            PullEvent::LayerProgress {
                digest, downloaded, ..
            } => {
                if let Some(bar) = bars.get(digest) {
                    bar.set_position(*downloaded);
                }
            }
            PullEvent::LayerDone {
                digest,
                size,
                cached,
                ..
            } => {
                let what = if *cached {
                    "already here"
                } else {
                    "downloaded"
                };
                let line = format!("{} {what} ({})", short(digest), human_bytes(*size));
                if let Some(bar) = bars.remove(digest) {
                    bar.finish_and_clear();
                }
                if interactive {
                    let _ = multi.println(line);
                } else {
                    eprintln!("{line}");
                }
            }
            _ => {}
        }
    });
    (options, display)
}

/// Clears the bars when dropped.
pub struct Display {
    multi: MultiProgress,
}

impl Drop for Display {
    fn drop(&mut self) {
        let _ = self.multi.clear();
    }
}

/// `sha256:0123456789ab` → `0123456789ab`.
pub fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

/// Sizes as `docker images` shows them (decimal units).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}
