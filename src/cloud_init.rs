//! Builds a server's cloud-init `user_data` from a plan's typed template.
//!
//! Output, in this order: `#cloud-config`, then `hostname`, `disable_root: false`,
//! `ssh_pwauth: false`, `ssh_authorized_keys` (the subscription's public key), then the
//! template's `package_update`, `package_upgrade`, `packages`, `write_files`, `runcmd` (empty
//! lists are left out).
//!
//! Login is by key only, as root: Hetzner images log in as root, and cloud-init gives root the
//! default user's keys; `disable_root: false` keeps it from prefixing them with a "please log
//! in as ..." command, and `ssh_pwauth: false` turns password logins off. (The controller also
//! attaches the same key through Hetzner's `ssh_keys`, which covers images without cloud-init.)
//!
//! Placeholder: `{{hostname}}` in `write_files[].content` and in `runcmd` entries is replaced by
//! the server's hostname. Nothing else is substituted; other `{{...}}` text passes through
//! unchanged (cloud-init's own jinja templates keep working).
//!
//! Hetzner limits `user_data` to 32 KiB and stores it in plain text: no secrets belong in a
//! template.

use serde::{Deserialize, Serialize};

/// Hetzner's limit on `user_data`, in bytes.
pub const USER_DATA_LIMIT: usize = 32 * 1024;

/// The placeholder replaced by the server's hostname in file contents and commands.
pub const HOSTNAME_PLACEHOLDER: &str = "{{hostname}}";

/// The part of a plan's cloud-init that the config chooses. Every field may be omitted.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudInitTemplate {
    /// Run `apt-get update` (or the distribution's equivalent) on first boot.
    pub package_update: bool,
    /// Upgrade all packages on first boot (slow; unattended-upgrades is often enough).
    pub package_upgrade: bool,
    /// Packages to install on first boot.
    pub packages: Vec<String>,
    /// Files to write on first boot; `{{hostname}}` in `content` is substituted.
    pub write_files: Vec<WriteFile>,
    /// Shell commands to run once, at the end of first boot; `{{hostname}}` is substituted.
    pub runcmd: Vec<String>,
}

/// One `write_files` entry.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// Absolute path on the server.
    pub path: String,
    /// File content (text).
    pub content: String,
    /// Octal mode such as `"0644"`; cloud-init's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    /// `user:group`; cloud-init's default (root:root) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Why `user_data` could not be built. Never contains the `user_data` text itself.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    #[error("user_data is {size} bytes, over Hetzner's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("hostname {0:?} is not a lowercase RFC 1123 label of at most 63 characters")]
    InvalidHostname(String),
    #[error("the authorized key must be a single non-empty line")]
    InvalidAuthorizedKey,
    #[error("serializing user_data failed: {0}")]
    Serialize(String),
}

/// The document written after `#cloud-config`; field order is the output order.
#[derive(Serialize)]
struct UserData<'a> {
    hostname: &'a str,
    disable_root: bool,
    ssh_pwauth: bool,
    ssh_authorized_keys: [&'a str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_keys: Option<HostKeys<'a>>,
    package_update: bool,
    package_upgrade: bool,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    packages: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    write_files: Vec<WriteFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    runcmd: Vec<String>,
}

/// cloud-init's `ssh_keys`: the host key sshd presents (see `crate::ssh::host_key`).
#[derive(Serialize)]
struct HostKeys<'a> {
    ed25519_private: &'a str,
    ed25519_public: &'a str,
}

/// Renders `user_data` for one server: the template plus `hostname`, the subscription's
/// public key (`authorized_key`, an OpenSSH public key line) and, when given, the server's
/// Ed25519 host key (private OpenSSH key, public line) as cloud-init's `ssh_keys`.
pub fn render(
    template: &CloudInitTemplate,
    hostname: &str,
    authorized_key: &str,
    host_key: Option<(&str, &str)>,
) -> Result<String, CloudInitError> {
    if !is_rfc1123_label(hostname) {
        return Err(CloudInitError::InvalidHostname(hostname.to_owned()));
    }
    let authorized_key = authorized_key.trim();
    if authorized_key.is_empty() || authorized_key.chars().any(char::is_control) {
        return Err(CloudInitError::InvalidAuthorizedKey);
    }
    let substitute = |text: &str| text.replace(HOSTNAME_PLACEHOLDER, hostname);
    let document = UserData {
        hostname,
        disable_root: false,
        ssh_pwauth: false,
        ssh_authorized_keys: [authorized_key],
        ssh_keys: host_key.map(|(private, public)| HostKeys {
            ed25519_private: private,
            ed25519_public: public.trim(),
        }),
        package_update: template.package_update,
        package_upgrade: template.package_upgrade,
        packages: &template.packages,
        write_files: template
            .write_files
            .iter()
            .map(|file| WriteFile {
                content: substitute(&file.content),
                ..file.clone()
            })
            .collect(),
        runcmd: template.runcmd.iter().map(|cmd| substitute(cmd)).collect(),
    };
    let yaml =
        serde_norway::to_string(&document).map_err(|e| CloudInitError::Serialize(e.to_string()))?;
    let user_data = format!("#cloud-config\n{yaml}");
    if user_data.len() > USER_DATA_LIMIT {
        return Err(CloudInitError::TooLarge {
            size: user_data.len(),
            limit: USER_DATA_LIMIT,
        });
    }
    Ok(user_data)
}

/// A lowercase RFC 1123 label: 1–63 of `[a-z0-9-]`, not starting or ending with `-`. The
/// shape of every server name the controller makes.
pub fn is_rfc1123_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Longest hostname a server can get; used to check templates against the size limit.
const MAX_HOSTNAME_LEN: usize = 63;
/// An RSA-4096 `authorized_keys` line is about 725 bytes plus the comment; 1 KiB leaves room.
const MAX_AUTHORIZED_KEY_LEN: usize = 1024;
/// An Ed25519 host private key in OpenSSH format is about 420 bytes with its comment.
const MAX_HOST_KEY_LEN: usize = 600;

impl CloudInitTemplate {
    /// Checks the template, returning `(field, problem)` pairs with field paths relative to the
    /// template (e.g. `write_files[0].path`); empty when the template is fine. Includes a check
    /// that it renders under [`USER_DATA_LIMIT`] for the longest hostname and key.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (i, package) in self.packages.iter().enumerate() {
            if package.is_empty() || package.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push((
                    format!("packages[{i}]"),
                    format!("{package:?} is not a package name (empty or contains whitespace)"),
                ));
            }
        }
        let mut paths = std::collections::BTreeSet::new();
        for (i, file) in self.write_files.iter().enumerate() {
            let field = format!("write_files[{i}]");
            if !file.path.starts_with('/') || file.path.chars().any(char::is_control) {
                problems.push((
                    format!("{field}.path"),
                    format!("{:?} is not an absolute path", file.path),
                ));
            } else if file.path.ends_with('/') {
                problems.push((
                    format!("{field}.path"),
                    format!("{:?} names a directory, not a file", file.path),
                ));
            } else if !paths.insert(file.path.as_str()) {
                problems.push((
                    format!("{field}.path"),
                    format!("{:?} is written by an earlier entry too", file.path),
                ));
            }
            if let Some(permissions) = &file.permissions
                && !is_octal_mode(permissions)
            {
                problems.push((
                    format!("{field}.permissions"),
                    format!("{permissions:?} is not an octal mode such as \"0644\""),
                ));
            }
            if let Some(owner) = &file.owner
                && !is_owner(owner)
            {
                problems.push((
                    format!("{field}.owner"),
                    format!("{owner:?} is not \"user\" or \"user:group\""),
                ));
            }
        }
        for (i, command) in self.runcmd.iter().enumerate() {
            if command.trim().is_empty() {
                problems.push((format!("runcmd[{i}]"), "is empty".to_owned()));
            }
        }
        if problems.is_empty() {
            let hostname = "a".repeat(MAX_HOSTNAME_LEN);
            let key = format!("ssh-rsa {}", "A".repeat(MAX_AUTHORIZED_KEY_LEN - 8));
            // An Ed25519 host key in OpenSSH format is under 500 bytes.
            let host_private = "A".repeat(MAX_HOST_KEY_LEN);
            let host_public = format!("ssh-ed25519 {}", "A".repeat(68));
            match render(self, &hostname, &key, Some((&host_private, &host_public))) {
                Ok(_) => {}
                Err(CloudInitError::TooLarge { size, limit }) => problems.push((
                    String::new(),
                    format!(
                        "renders to up to {size} bytes of user_data, over Hetzner's limit of \
                         {limit} bytes"
                    ),
                )),
                Err(e) => problems.push((String::new(), e.to_string())),
            }
        }
        problems
    }
}

/// `0644`, `755`: three or four octal digits.
pub fn is_octal_mode(mode: &str) -> bool {
    (3..=4).contains(&mode.len()) && mode.bytes().all(|b| (b'0'..=b'7').contains(&b))
}

fn is_owner(owner: &str) -> bool {
    let is_name = |name: &str| {
        !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    match owner.split_once(':') {
        Some((user, group)) => is_name(user) && is_name(group),
        None => is_name(owner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm1m6zA4Y5bW1v0a7h2x0vJd2mC3rYk7qzY2fQ1aB3c sub-1";

    #[test]
    fn placeholder_is_substituted_in_files_and_commands_only() {
        let template = CloudInitTemplate {
            packages: vec!["{{hostname}}".into()],
            write_files: vec![WriteFile {
                path: "/etc/motd".into(),
                content: "Welcome to {{hostname}}\n".into(),
                permissions: Some("0644".into()),
                owner: None,
            }],
            runcmd: vec!["echo {{hostname}} {{ other }}".into()],
            ..Default::default()
        };
        let out = render(&template, "vps-abc", KEY, None).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&out).unwrap();
        assert_eq!(doc["write_files"][0]["content"], "Welcome to vps-abc\n");
        assert_eq!(doc["runcmd"][0], "echo vps-abc {{ other }}");
        assert_eq!(doc["packages"][0], "{{hostname}}");
    }

    #[test]
    fn bad_hostname_and_key_are_rejected() {
        let t = CloudInitTemplate::default();
        assert!(matches!(
            render(&t, "Bad_Host", KEY, None),
            Err(CloudInitError::InvalidHostname(_))
        ));
        assert!(matches!(
            render(&t, "", KEY, None),
            Err(CloudInitError::InvalidHostname(_))
        ));
        assert!(matches!(
            render(&t, &"a".repeat(64), KEY, None),
            Err(CloudInitError::InvalidHostname(_))
        ));
        assert!(matches!(
            render(&t, "ok", "", None),
            Err(CloudInitError::InvalidAuthorizedKey)
        ));
        assert!(matches!(
            render(&t, "ok", "ssh-ed25519 AAAA\nruncmd: [evil]", None),
            Err(CloudInitError::InvalidAuthorizedKey)
        ));
    }

    #[test]
    fn template_problems_name_the_field() {
        let template = CloudInitTemplate {
            packages: vec!["ok".into(), "two words".into()],
            write_files: vec![
                WriteFile {
                    path: "relative".into(),
                    content: String::new(),
                    permissions: Some("644x".into()),
                    owner: Some("root:".into()),
                },
                WriteFile {
                    path: "/a".into(),
                    content: String::new(),
                    permissions: None,
                    owner: None,
                },
                WriteFile {
                    path: "/a".into(),
                    content: String::new(),
                    permissions: None,
                    owner: None,
                },
            ],
            runcmd: vec![" ".into()],
            ..Default::default()
        };
        let fields: Vec<String> = template.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "packages[1]",
                "write_files[0].path",
                "write_files[0].permissions",
                "write_files[0].owner",
                "write_files[2].path",
                "runcmd[0]"
            ]
        );
    }

    #[test]
    fn template_too_large_for_the_longest_key_is_a_problem() {
        let template = CloudInitTemplate {
            runcmd: vec!["x".repeat(USER_DATA_LIMIT - 900)],
            ..Default::default()
        };
        // Fits with a short key ...
        assert!(render(&template, "a", KEY, None).is_ok());
        // ... but not with a 63-character hostname and an RSA-4096 key, so the config rejects it.
        let problems = template.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].1.contains("over Hetzner's limit"),
            "{problems:?}"
        );
    }
}
