//! Capturing the server's log lines in a test: [`Logs::capture`] (text) or
//! [`Logs::capture_json`], per test thread, while tests run in parallel.

use std::sync::Arc;

/// Log lines captured by a test subscriber.
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<tracing::Dispatch>> = const { std::cell::RefCell::new(None) };
}

/// The global subscriber of the test binary: forwards to this thread's capturing
/// subscriber, if any. (Scoped `set_default` subscribers share tracing's global
/// callsite cache, so tests running in parallel could disable each other's events.)
struct PerThread;

fn with_current<T>(f: impl FnOnce(&tracing::Dispatch) -> T) -> Option<T> {
    CURRENT.with(|c| c.borrow().as_ref().map(f))
}

impl tracing::Subscriber for PerThread {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        with_current(|d| d.enabled(m)).unwrap_or(false)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        with_current(|d| d.new_span(a)).unwrap_or_else(|| tracing::span::Id::from_u64(1))
    }
    fn record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>) {
        with_current(|d| d.record(id, v));
    }
    fn record_follows_from(&self, a: &tracing::span::Id, b: &tracing::span::Id) {
        with_current(|d| d.record_follows_from(a, b));
    }
    fn event(&self, e: &tracing::Event<'_>) {
        with_current(|d| d.event(e));
    }
    fn enter(&self, id: &tracing::span::Id) {
        with_current(|d| d.enter(id));
    }
    fn exit(&self, id: &tracing::span::Id) {
        with_current(|d| d.exit(id));
    }
}

/// A scoped subscriber that forwards to one capturing subscriber, and, like
/// [`PerThread`], never lets tracing cache a callsite as disabled. The server hands
/// the scoped default of the thread that accepted a connection to the thread that
/// serves it, so a test captures its own server's connection threads too.
struct Fixed(tracing::Dispatch);

impl tracing::Subscriber for Fixed {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(a)
    }
    fn record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>) {
        self.0.record(id, v);
    }
    fn record_follows_from(&self, a: &tracing::span::Id, b: &tracing::span::Id) {
        self.0.record_follows_from(a, b);
    }
    fn event(&self, e: &tracing::Event<'_>) {
        self.0.event(e);
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.0.enter(id);
    }
    fn exit(&self, id: &tracing::span::Id) {
        self.0.exit(id);
    }
}

/// Installs [`PerThread`] as the global subscriber (once per test binary).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(PerThread);
    });
}

/// Stops capturing on this thread when dropped.
pub struct Capture(#[allow(dead_code)] tracing::dispatcher::DefaultGuard);

impl Drop for Capture {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Captures this thread's logs at `level` (text format) until the guard is dropped.
    /// Tests run the server on a current-thread runtime, so its tasks log on this thread.
    pub fn capture(&self, level: tracing::Level) -> Capture {
        let logs = self.clone();
        self.capture_with(
            tracing_subscriber::fmt()
                .fmt_fields(ratelimit_policyd::escape::TextFields)
                .with_max_level(level)
                .with_ansi(false)
                .with_writer(move || logs.clone())
                .finish(),
        )
    }

    /// Captures in JSON.
    pub fn capture_json(&self, level: tracing::Level) -> Capture {
        let logs = self.clone();
        self.capture_with(
            tracing_subscriber::fmt()
                .json()
                .with_max_level(level)
                .with_ansi(false)
                .with_writer(move || logs.clone())
                .finish(),
        )
    }

    fn capture_with(&self, sub: impl tracing::Subscriber + Send + Sync + 'static) -> Capture {
        init_logs();
        let dispatch = tracing::Dispatch::new(sub);
        CURRENT.with(|c| *c.borrow_mut() = Some(dispatch.clone()));
        Capture(tracing::dispatcher::set_default(&tracing::Dispatch::new(
            Fixed(dispatch),
        )))
    }
}
