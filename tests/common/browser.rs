//! Headless Chromium for the page tests: Debian's `chromium`, driven over WebDriver by
//! Debian's `chromedriver` (`make test` installs both; a browser is never downloaded), and a
//! tab of it with the reads the tests make of the demo page.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client as Browser, ClientBuilder, Locator, wd::WindowHandle};
use serde_json::{Value, json};

use super::{WAIT, eventually, workspace};

/// `$CHROMIUM_BIN` or Debian's `/usr/bin/chromium`; `make test` installs it when missing.
fn chromium() -> String {
    std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn chromedriver() -> String {
    std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "/usr/bin/chromedriver".into())
}

pub struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    pub async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            // A process group of its own, which the browsers it starts join: on drop the whole
            // group goes, so that a failed test leaves no browser behind to reconnect to the
            // next test's servers.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; `make test` installs Debian's chromium and chromium-driver",
                    chromedriver()
                )
            });
        eventually("chromedriver to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        Driver { child, port }
    }

    pub async fn browser(&self, profile: &std::path::Path) -> Browser {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            // Background tabs keep their timers, so tab B reconnects on schedule.
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--window-size=1200,820",
        ]
        .into_iter()
        .map(String::from)
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let capabilities = json!({
            "goog:chromeOptions": { "binary": chromium(), "args": args }
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(capabilities);
        let url = format!("http://127.0.0.1:{}", self.port);
        let session = builder.connect(&url);
        // A cold start (fresh profile, font caches) on a busy machine can take far longer
        // than any wait on fanout itself.
        tokio::time::timeout(BROWSER_START, session)
            .await
            .unwrap_or_else(|_| panic!("chromium did not start within {BROWSER_START:?}"))
            .expect("chromedriver could not start chromium")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// One tab of the browser session.
pub struct Tab<'a> {
    pub browser: &'a Browser,
    pub handle: WindowHandle,
    pub name: &'static str,
}

impl<'a> Tab<'a> {
    /// `browser`'s first tab, at `url`.
    pub async fn first(browser: &'a Browser, name: &'static str, url: &str) -> Tab<'a> {
        browser.goto(url).await.unwrap();
        Tab {
            browser,
            handle: browser.window().await.unwrap(),
            name,
        }
    }

    /// A new tab (window) of `browser`, focused, at `url`.
    pub async fn open(browser: &'a Browser, name: &'static str, url: &str) -> Tab<'a> {
        let tab = Tab {
            browser,
            handle: browser.new_window(true).await.unwrap().handle,
            name,
        };
        tab.focus().await;
        browser.goto(url).await.unwrap();
        tab
    }

    pub async fn focus(&self) {
        self.browser
            .switch_to_window(self.handle.clone())
            .await
            .unwrap();
    }

    /// Runs `script` (a function body) in this tab and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.focus().await;
        self.browser.execute(script, vec![]).await.unwrap()
    }

    pub async fn state(&self) -> (String, String) {
        let v = self
            .eval("return [document.getElementById('conn').dataset.state, document.getElementById('node').textContent]")
            .await;
        (v[0].as_str().unwrap().into(), v[1].as_str().unwrap().into())
    }

    /// Waits until the tab shows `state` (and, when open, `node`), for at most `bound`.
    pub async fn wait_for_within(&self, bound: Duration, state: &str, node: Option<&str>) {
        let what = format!("tab {} to show {state} {node:?}", self.name);
        self.until(bound, &what, || async {
            let (s, n) = self.state().await;
            s == state && node.is_none_or(|node| n == node)
        })
        .await;
    }

    /// Polls `check` until it holds, for at most `bound`; the failure says what the tab shows.
    pub async fn until<F, Fut>(&self, bound: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + bound;
        while !check().await {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after {bound:?} waiting for {what}; tab {} shows {}",
                    self.name,
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Tab::wait_for_within`] [`WAIT`].
    pub async fn wait_for(&self, state: &str, node: Option<&str>) {
        self.wait_for_within(WAIT, state, node).await;
    }

    /// What the tab says it is pinned to (`#pin`): the name, and whether it failed over.
    pub async fn pin(&self) -> (String, bool) {
        let v = self
            .eval("const pin = document.getElementById('pin'); return [pin.dataset.pinned ?? '', pin.dataset.away === 'true']")
            .await;
        (v[0].as_str().unwrap().into(), v[1].as_bool().unwrap())
    }

    /// The (channel, seq) of every event in the tab's log, newest first.
    pub async fn events(&self) -> Vec<(String, u64)> {
        let v = self
            .eval("return [...document.querySelectorAll('#log li')].map(li => [li.dataset.channel, Number(li.dataset.seq)])")
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_u64().unwrap()))
            .collect()
    }

    pub async fn wait_for_event(&self, seq: u64) {
        let what = format!("event #{seq}");
        self.until(WAIT, &what, || async {
            self.events().await.iter().any(|(_, s)| *s == seq)
        })
        .await;
    }

    /// What the tab shows (state, node, result line, log, members), for failure messages.
    pub async fn dump(&self) -> Value {
        self.eval(
            "return Object.fromEntries(['conn', 'node', 'pin', 'result', 'log', 'members'].map((id) => \
             [id, document.getElementById(id).innerText + ' ' + \
             (document.getElementById(id).dataset.state ?? '')]))",
        )
        .await
    }

    /// The lobby's member list as the tab shows it: "name-or-user · node".
    pub async fn members(&self) -> Vec<String> {
        let v = self
            .eval("return [...document.querySelectorAll('#members li')].map(li => li.textContent)")
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect()
    }

    pub async fn click(&self, id: &str) {
        self.focus().await;
        self.browser
            .find(Locator::Id(id))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    pub async fn screenshot(&self, file: &str) -> PathBuf {
        self.focus().await;
        let png = self.browser.screenshot().await.unwrap();
        let dir = workspace().join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file);
        std::fs::write(&path, png).unwrap();
        path
    }
}

/// How long chromium may take to start.
pub const BROWSER_START: Duration = Duration::from_secs(90);

/// fanout.js's longest reconnect delay (`maxDelay`, 15 s), plus [`WAIT`] for the attempt.
pub const RECONNECT_BOUND: Duration = Duration::from_secs(15 + 15);
