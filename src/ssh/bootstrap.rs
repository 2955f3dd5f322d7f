//! The bootstrap of one server over one SSH session: wait for cloud-init, then apply the
//! plan's steps that the marker on the server does not record as done, recording each one as
//! it finishes.
//!
//! The marker (`/var/lib/vps-controller/bootstrap`, mode 0600) holds the bootstrap version and
//! how many steps are done. A bootstrap interrupted between steps (crash, lost connection,
//! failed step) resumes after the last step recorded; a step that was running when it was
//! interrupted runs again, so a step should be safe to repeat (write files with `upload`,
//! make commands idempotent). A new version starts from the first step.

use std::time::Duration;

use crate::config::{Bootstrap, BootstrapStep};

use super::SshError;
use super::session::{Session, quote};

pub const MARKER_PATH: &str = "/var/lib/vps-controller/bootstrap";

/// Time limits of the steps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub cloud_init: Duration,
    pub command: Duration,
}

/// What one bootstrap did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ran {
    /// Steps the marker recorded as done: not run again.
    pub skipped: usize,
    /// Steps run now.
    pub ran: usize,
}

/// Waits for cloud-init to finish, then runs the steps of `bootstrap` not yet done.
pub async fn run(
    session: &Session,
    bootstrap: Option<&Bootstrap>,
    limits: Limits,
) -> Result<Ran, SshError> {
    wait_for_cloud_init(session, limits.cloud_init).await?;
    let Some(bootstrap) = bootstrap else {
        return Ok(Ran::default());
    };
    let read = session
        .exec(
            &format!("cat {}", quote(MARKER_PATH)),
            None,
            limits.command,
            "reading the bootstrap marker",
        )
        .await?;
    // `cat` fails when there is no marker yet: nothing done.
    let marker = read
        .success()
        .then(|| String::from_utf8_lossy(&read.stdout).into_owned());
    let total = bootstrap.steps.len();
    let done = steps_done(marker.as_deref(), &bootstrap.version, total);
    for (index, step) in bootstrap.steps.iter().enumerate().skip(done) {
        let what = step_name(index, total, step);
        let output = match step {
            BootstrapStep::Upload(upload) => {
                session
                    .exec(
                        &install_command(&upload.mode, &upload.path),
                        Some(upload.content.as_bytes()),
                        limits.command,
                        &what,
                    )
                    .await?
            }
            BootstrapStep::Run(command) => {
                session.exec(command, None, limits.command, &what).await?
            }
        };
        if !output.success() {
            return Err(SshError::StepFailed {
                step: what,
                exit_status: output.exit_status,
                output: output.summary(),
            });
        }
        let record = marker_text(&bootstrap.version, index + 1);
        let written = session
            .exec(
                &install_command("0600", MARKER_PATH),
                Some(record.as_bytes()),
                limits.command,
                "writing the bootstrap marker",
            )
            .await?;
        if !written.success() {
            return Err(SshError::StepFailed {
                step: "writing the bootstrap marker".into(),
                exit_status: written.exit_status,
                output: written.summary(),
            });
        }
    }
    Ok(Ran {
        skipped: done,
        ran: total - done.min(total),
    })
}

/// `cloud-init status --wait`: 0 is done, 2 is done with recoverable errors (cloud-init 23.4
/// and later), anything else failed.
async fn wait_for_cloud_init(session: &Session, limit: Duration) -> Result<(), SshError> {
    let output = session
        .exec(
            "cloud-init status --wait",
            None,
            limit,
            "waiting for cloud-init",
        )
        .await?;
    match output.exit_status {
        Some(0) | Some(2) => Ok(()),
        _ => Err(SshError::CloudInitFailed {
            exit_status: output.exit_status,
            output: output.summary(),
        }),
    }
}

/// Writes stdin to `path` with `mode`, creating parent directories (coreutils `install`).
fn install_command(mode: &str, path: &str) -> String {
    format!("install -D -m {} /dev/stdin {}", quote(mode), quote(path))
}

fn step_name(index: usize, total: usize, step: &BootstrapStep) -> String {
    match step {
        BootstrapStep::Upload(upload) => {
            format!("step {} of {total} (upload {})", index + 1, upload.path)
        }
        BootstrapStep::Run(_) => format!("step {} of {total} (run)", index + 1),
    }
}

/// The marker's text after `done` steps of `version`.
pub fn marker_text(version: &str, done: usize) -> String {
    format!("version={version}\nsteps_done={done}\n")
}

/// How many of `total` steps of `version` the marker records as done: 0 without a marker,
/// for another version, or for one that does not parse.
pub fn steps_done(marker: Option<&str>, version: &str, total: usize) -> usize {
    let Some(marker) = marker else { return 0 };
    let field = |name: &str| {
        marker
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
    };
    if field("version") != Some(version) {
        return 0;
    }
    field("steps_done")
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.min(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_says_where_to_resume() {
        let cases: &[(Option<&str>, &str, usize, usize)] = &[
            (None, "1", 3, 0),
            (Some(""), "1", 3, 0),
            (Some("version=1\nsteps_done=2\n"), "1", 3, 2),
            (Some("version=1\nsteps_done=3\n"), "1", 3, 3),
            // A different version starts over.
            (Some("version=1\nsteps_done=2\n"), "2", 3, 0),
            // More done than there are steps now (steps removed): all done.
            (Some("version=1\nsteps_done=9\n"), "1", 3, 3),
            (Some("version=1\nsteps_done=x\n"), "1", 3, 0),
            (Some("steps_done=2\nversion=1\n"), "1", 3, 2),
            (Some("version=10\nsteps_done=2\n"), "1", 3, 0),
        ];
        for (marker, version, total, want) in cases {
            assert_eq!(
                steps_done(*marker, version, *total),
                *want,
                "{marker:?} {version}"
            );
        }
        assert_eq!(steps_done(Some(&marker_text("v-2", 4)), "v-2", 5), 4);
    }

    #[test]
    fn uploads_use_install_with_quoted_arguments() {
        assert_eq!(
            install_command("0644", "/etc/my app/conf"),
            "install -D -m 0644 /dev/stdin '/etc/my app/conf'"
        );
    }
}
