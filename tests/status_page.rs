//! The read-only status page at `/` of the real `vps-controller run --simulate`, as a user sees
//! it: in a real headless browser (Debian's `chromium`; another binary can be named in
//! `CHROMIUM`), and over plain HTTP for what a browser would hide (escaping, size, secrets).
//!
//! Without chromium the browser test skips with a loud warning, unless `CI` is set (and not
//! `false`/`0`), where it fails. The screenshot is kept as an artifact in
//! `target/status-page/status-page.png`.

mod common;

use common::process::*;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, Statement};
use tokio::time::{Instant, sleep};

use vps_controller::db::{self, entities::subscription, installation};

const CHROMIUM_HINT: &str =
    "install it with: apt-get install chromium (or point CHROMIUM at a Chromium/Chrome binary)";
/// Generous for a loaded machine; this only stops a hung browser.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);
/// Far above what the page renders (a few kB), far below a 100 kB row.
const PAGE_SIZE_BOUND: usize = 32 * 1024;

/// `run --simulate` on `database_url`, with the token set so that a leak would show; the
/// controller and the base URL of its metrics port (where the page is).
async fn start_controller(dir: &Path, database_url: &str) -> (ChildGuard, String) {
    let key = encryption_key();
    spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            command(
                dir,
                &["run", "--simulate", "--listen", &listen],
                &[
                    ("DATABASE_URL", database_url),
                    ("HCLOUD_TOKEN", SECRET_TOKEN),
                    ("VPS_CONTROLLER_ENCRYPTION_KEY", &key),
                ],
            )
        },
        "/readyz",
    )
    .await
}

/// Polls the row until `done` holds for it; fails with the controller's output after DEADLINE.
async fn wait_for_row(
    db: &DatabaseConnection,
    id: &str,
    what: &str,
    controller: &ChildGuard,
    done: impl Fn(&subscription::Model) -> bool,
) -> subscription::Model {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let row = subscription::Entity::find_by_id(id.to_string())
            .one(db)
            .await
            .ok()
            .flatten();
        if let Some(row) = &row
            && done(row)
        {
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{id} not {what} within {DEADLINE:?}: {row:?}\n{}",
            controller.output()
        );
        sleep(POLL).await;
    }
}

fn failed_with_error(row: &subscription::Model) -> bool {
    row.provisioning_status == "failed"
        && row
            .provisioning_error
            .as_deref()
            .is_some_and(|e| !e.is_empty())
}

/// GET `/`: the response, with its status and content type checked.
async fn get_page(base_url: &str) -> (reqwest::header::HeaderMap, String) {
    let response = http_client()
        .get(format!("{base_url}/"))
        .send()
        .await
        .expect("GET / answers");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(
        headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    (headers, response.text().await.expect("page body"))
}

/// The text inside the element with `id="…"` (up to its first child tag or end tag).
fn text_by_id<'a>(html: &'a str, id: &str) -> Option<&'a str> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let start = at + html[at..].find('>')? + 1;
    let end = start + html[start..].find('<')?;
    Some(&html[start..end])
}

/// The `<section id="…">` of the page.
fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let Some(start) = html.find(&format!("<section id=\"{id}\"")) else {
        panic!("no section {id:?} in the page:\n{html}");
    };
    let end = html[start..]
        .find("</section>")
        .map_or(html.len(), |end| start + end);
    &html[start..end]
}

/// The count in the fleet table's row for `status`.
fn fleet_count(html: &str, status: &str) -> Option<i64> {
    let fleet = section(html, "fleet");
    let at = fleet.find(&format!(">{status}</th>"))?;
    let rest = &fleet[at..];
    let cell = rest.find("<td")?;
    let start = cell + rest[cell..].find('>')? + 1;
    let end = start + rest[start..].find('<')?;
    rest[start..end].trim().parse().ok()
}

/// Chromium, or `None` after a loud skip notice (a panic under CI).
fn chromium_or_skip(test: &str) -> Option<String> {
    let program = std::env::var("CHROMIUM")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "chromium".to_string());
    let reason = match std::process::Command::new(&program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) if output.status.success() => return Some(program),
        Ok(output) => format!(
            "`{program} --version` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => format!("cannot run `{program}`: {e}"),
    };
    common::skip_or_fail(test, &format!("needs chromium: {reason}"), CHROMIUM_HINT);
    None
}

/// Runs headless chromium with its own throw-away profile; its stdout.
async fn chromium(program: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("temp dir for the chromium profile");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        // Containers often have a tiny /dev/shm.
        "--disable-dev-shm-usage",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let output = match tokio::time::timeout(BROWSER_TIMEOUT, cmd.output()).await {
        Ok(output) => output.expect("chromium starts"),
        Err(_) => panic!(
            "`{program} {}` still running after {BROWSER_TIMEOUT:?}",
            args.join(" ")
        ),
    };
    assert!(
        output.status.success(),
        "`{program} {}` failed ({})\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `target/` (or `$CARGO_TARGET_DIR`): from the environment, else from this test executable's
/// path (`target/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Width and height from a PNG's IHDR chunk, if `png` is one.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let height = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((width, height))
}

async fn screenshot(program: &str, url: &str, path: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    chromium(
        program,
        &[
            &format!("--screenshot={}", path.display()),
            "--window-size=1280,1000",
            url,
        ],
    )
    .await;
    std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shows_role_fleet_failing_subscription_and_events() {
    let test = "a_browser_shows_role_fleet_failing_subscription_and_events";
    let Some(browser) = chromium_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let (controller, base_url) = start_controller(dir.path(), &url).await;
    let db = db::connect(&url).await.unwrap();
    insert_subscription(&db, "web-1", "active", "starter").await;
    // A plan the built-in config does not know: the controller marks the row failed.
    insert_subscription(&db, "gold-1", "active", "gold").await;
    let gold = wait_for_row(&db, "gold-1", "failed", &controller, failed_with_error).await;
    let error = gold.provisioning_error.unwrap_or_default();
    assert!(error.contains("is not a configured plan"), "{error}");
    wait_for_row(&db, "web-1", "ready", &controller, |row| {
        row.provisioning_status == "ready"
    })
    .await;
    let installation = installation::id(&db).await.unwrap();

    let dom = chromium(&browser, &["--dump-dom", &format!("{base_url}/")]).await;
    let context = format!("--- DOM ---\n{dom}\n{}", controller.output());
    assert_eq!(text_by_id(&dom, "role"), Some("leader"), "{context}");
    assert_eq!(
        text_by_id(&dom, "installation"),
        Some(installation.as_str()),
        "{context}"
    );
    assert_eq!(
        text_by_id(&dom, "version"),
        Some(env!("CARGO_PKG_VERSION")),
        "{context}"
    );
    assert_eq!(fleet_count(&dom, "ready"), Some(1), "{context}");
    assert_eq!(fleet_count(&dom, "failed"), Some(1), "{context}");
    assert_eq!(fleet_count(&dom, "total"), Some(2), "{context}");
    let failing = section(&dom, "failing");
    assert!(failing.contains("gold-1"), "{context}");
    // The browser shows the text, quotes and all, as the controller wrote it.
    assert!(failing.contains(&error), "{error:?} not shown\n{context}");
    assert!(
        !failing.contains("web-1"),
        "a healthy row listed as failing\n{context}"
    );
    let events = section(&dom, "events");
    for shown in [
        "gold-1",
        "Warning",
        "Failed",
        "web-1",
        "ServerCreated",
        "Ready",
    ] {
        assert!(
            events.contains(shown),
            "{shown} missing from the events\n{context}"
        );
    }
    assert_eq!(text_by_id(&dom, "budget-limit"), Some("3600"), "{context}");
    let remaining: u32 = text_by_id(&dom, "budget-remaining")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no budget-remaining\n{context}"));
    assert!(remaining <= 3600, "{context}");
    assert!(section(&dom, "budget").contains("not paused"), "{context}");
    let rendered = dom
        .split_once("id=\"rendered\"><time datetime=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .and_then(|(at, _)| chrono::DateTime::parse_from_rfc3339(at).ok())
        .unwrap_or_else(|| panic!("no render time\n{context}"));
    let age = chrono::Utc::now().signed_duration_since(rendered);
    assert!(
        age >= chrono::TimeDelta::seconds(-5) && age < chrono::TimeDelta::minutes(5),
        "rendered at {rendered}, {age} ago\n{context}"
    );
    assert!(!dom.to_ascii_lowercase().contains("<script"), "{context}");

    let artifacts = target_dir().join("status-page");
    std::fs::create_dir_all(&artifacts).unwrap();
    let path = artifacts.join("status-page.png");
    let png = screenshot(&browser, &format!("{base_url}/"), &path).await;
    assert_eq!(
        png_size(&png),
        Some((1280, 1000)),
        "{} is not a 1280x1000 PNG",
        path.display()
    );
    // The same window with nothing in it, for scale: a page with content compresses worse.
    let scratch = tempfile::tempdir().unwrap();
    let blank = screenshot(&browser, "about:blank", &scratch.path().join("blank.png")).await;
    assert!(
        png.len() > 3 * blank.len(),
        "the screenshot ({} bytes) is hardly bigger than a blank page ({} bytes): {}",
        png.len(),
        blank.len(),
        path.display()
    );
    eprintln!("status page screenshot: {}", path.display());
    controller.assert_no_secret();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_row_data_renders_escaped_and_bounded() {
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let (controller, base_url) = start_controller(dir.path(), &test_db.url).await;
        let db = db::connect(&test_db.url).await.unwrap();
        // The controller echoes the unknown plan in its error and in a Warning event.
        insert_subscription(&db, "xss-1", "active", "<script>alert(1)</script>").await;
        wait_for_row(&db, "xss-1", "failed", &controller, failed_with_error).await;
        // Then a huge error with markup and a terminal escape sequence, as any writer could
        // leave it. Only a status column changes: the controller does not look at the row again.
        let huge = format!("<script>alert(1)</script>\u{1b}[31m{}", "E".repeat(100_000));
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE subscriptions SET provisioning_error = $1 WHERE id = 'xss-1'",
            [huge.into()],
        ))
        .await
        .unwrap();

        let (headers, page) = get_page(&base_url).await;
        let context = format!("[{backend}]\n{page}\n{}", controller.output());
        assert!(
            page.len() < PAGE_SIZE_BOUND,
            "[{backend}] a page of {} bytes for one 100 kB row",
            page.len()
        );
        assert!(
            !page.to_ascii_lowercase().contains("<script"),
            "raw <script> on the page\n{context}"
        );
        assert!(!page.contains('\u{1b}'), "raw escape character\n{context}");
        // Every query works on this backend.
        assert!(!page.contains("database unavailable"), "{context}");
        assert_eq!(fleet_count(&page, "failed"), Some(1), "{context}");
        let failing = section(&page, "failing");
        assert!(failing.contains("xss-1"), "{context}");
        assert!(
            failing.contains("&lt;script&gt;alert(1)&lt;/script&gt;\\u{1b}[31mEEEE"),
            "the error is not shown as text\n{context}"
        );
        let longest_run = failing.split(|c| c != 'E').map(str::len).max().unwrap_or(0);
        assert!(
            (200..=300).contains(&longest_run),
            "[{backend}] the error is not cut to a few hundred characters: {longest_run}"
        );
        assert!(failing.contains("E…"), "a cut error ends with …\n{context}");
        // The plan in the events (the controller's message) is text too.
        assert!(
            section(&page, "events").contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{context}"
        );
        let csp = headers
            .get(reqwest::header::CONTENT_SECURITY_POLICY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            csp.contains("default-src 'none'"),
            "[{backend}] CSP: {csp:?}"
        );

        controller.assert_no_secret();
        drop(controller);
        db.close().await.ok();
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let (controller, base_url) = start_controller(dir.path(), &url).await;
    let db = db::connect(&url).await.unwrap();
    insert_subscription(&db, "web-1", "active", "starter").await;
    // Ready: the key pair is generated, sealed and stored on the row, the server has its
    // user_data.
    let row = wait_for_row(&db, "web-1", "ready", &controller, |row| {
        row.provisioning_status == "ready"
    })
    .await;
    let sealed = row
        .ssh_private_key
        .expect("a sealed private key on the row");
    let public = row.ssh_public_key.expect("a public key on the row");
    // An error on the row lists it with the failing ones too, the table a leak of its key
    // columns would show up in.
    db.execute_unprepared(
        "UPDATE subscriptions SET provisioning_error = 'simulated: a transient error' \
         WHERE id = 'web-1'",
    )
    .await
    .unwrap();

    let (_, page) = get_page(&base_url).await;
    // A page with the row on it, so that the absences below mean something.
    assert_eq!(fleet_count(&page, "ready"), Some(1), "{page}");
    assert!(section(&page, "events").contains("web-1"), "{page}");
    let failing = section(&page, "failing");
    assert!(
        failing.contains("web-1") && failing.contains("simulated: a transient error"),
        "{page}"
    );
    let public_key_body = public.split_whitespace().nth(1).unwrap_or(&public);
    let key = encryption_key();
    for (what, secret) in [
        ("the API token", SECRET_TOKEN),
        ("private key text", "PRIVATE KEY"),
        ("the sealed private key", &sealed[..sealed.len().min(40)]),
        (
            "the public key",
            &public_key_body[..public_key_body.len().min(40)],
        ),
        ("the encryption key", &key),
        ("user_data", "#cloud-config"),
    ] {
        assert!(!page.contains(secret), "{what} on the status page:\n{page}");
    }
    controller.assert_no_secret();
}
