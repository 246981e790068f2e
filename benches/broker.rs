//! Broker benchmark: figures, not judgements. Run with `cargo bench --bench broker`.
//!
//! Drives a real `mqic serve` process (the release binary) with the lapin client over TCP:
//! - transient throughput: 2 producers, 2 consumers, 512 B bodies, prefetch 500, manual
//!   acks with `multiple` every 250 messages;
//! - end-to-end latency p50/p99 at a fixed 2,000 msg/s (1 producer, 1 consumer);
//! - idle RSS of the mqic process;
//! - time from process start to accepting AMQP connections.
//!
//! - persistent throughput with confirms: a durable queue, delivery_mode 2, 512 B bodies, one
//!   publisher with a confirm window of 256 (then two publishers; then one publisher with the
//!   amqprs client, which leaves more of a small machine's CPU to the broker); confirmed
//!   messages per second;
//! - recovery: publish `MQIC_BENCH_DURABLE_COUNT` (default 1,000,000) persistent 512 B
//!   messages to a durable queue, the RSS with them queued, then stop mqic (SIGTERM), start it
//!   again on the same data dir and time until the queue reports them all ready and until the
//!   first one is consumed.
//!
//! With `MQIC_BENCH_RABBITMQ_URL` set, the same loads run against that broker in the same
//! run and the ratios are printed (`MQIC_BENCH_RABBITMQ_PID` adds its RSS). `MQIC_BENCH_SECS`
//! sets the throughput window (default 10 s); `MQIC_BENCH_ONLY` (a comma list of `transient`,
//! `persistent`, `recovery`) runs only those parts.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const BODY: usize = 512;
const PREFETCH: u16 = 500;
const ACK_EVERY: u64 = 250;
const PIPELINE: usize = 32;
const LATENCY_RATE: u64 = 2_000;
const LATENCY_SECS: u64 = 5;

struct Figures {
    published: f64,
    consumed: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The same latency load driven by amqprs, a second client, as a check on client noise.
    amqprs_p50_ms: f64,
    amqprs_p99_ms: f64,
}

fn main() {
    let secs: u64 = std::env::var("MQIC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // `MQIC_BENCH_ONLY=persistent,recovery` runs only the named parts (transient, persistent,
    // recovery); all of them by default.
    let only = std::env::var("MQIC_BENCH_ONLY").ok();
    let runs = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == part))
    };

    let (mut child, url, start_ms, dir) = start_mqic();
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = rss_kib(child.id());
    println!("mqic start to accepting AMQP: {start_ms:.1} ms");
    println!("mqic idle RSS: {:.1} MB", idle_rss as f64 / 1024.0);

    let mqic = runs("transient").then(|| rt.block_on(measure(&url, secs)));
    if let Some(f) = &mqic {
        print_figures("mqic", f);
    }
    let mqic_persistent = runs("persistent").then(|| {
        let one = rt.block_on(persistent_confirms(&url, secs, 1));
        print_persistent("mqic", one, 1);
        let two = rt.block_on(persistent_confirms(&url, secs, 2));
        print_persistent("mqic", two, 2);
        let rs = rt.block_on(persistent_confirms_amqprs(&url, secs));
        print_persistent_amqprs("mqic", rs);
        (one, two, rs)
    });
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    drop(dir);

    let count: u64 = std::env::var("MQIC_BENCH_DURABLE_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    if runs("recovery") {
        recovery(&rt, count);
    }

    if let Ok(rabbit_url) = std::env::var("MQIC_BENCH_RABBITMQ_URL") {
        if let Ok(pid) = std::env::var("MQIC_BENCH_RABBITMQ_PID") {
            if let Ok(pid) = pid.trim().parse() {
                let rss = rss_kib(pid);
                println!(
                    "RabbitMQ idle RSS (pid {pid}): {:.1} MB",
                    rss as f64 / 1024.0
                );
                println!(
                    "ratio idle RSS mqic/RabbitMQ: {:.3}",
                    idle_rss as f64 / rss as f64
                );
            }
        }
        if let Some((one, two, rs)) = mqic_persistent {
            let rabbit_one = rt.block_on(persistent_confirms(&rabbit_url, secs, 1));
            print_persistent("RabbitMQ", rabbit_one, 1);
            let rabbit_two = rt.block_on(persistent_confirms(&rabbit_url, secs, 2));
            print_persistent("RabbitMQ", rabbit_two, 2);
            let rabbit_rs = rt.block_on(persistent_confirms_amqprs(&rabbit_url, secs));
            print_persistent_amqprs("RabbitMQ", rabbit_rs);
            println!(
                "ratio persistent confirmed throughput mqic/RabbitMQ: 1 publisher {:.2}x, 2 publishers {:.2}x, 1 amqprs publisher {:.2}x (target >= 3x)",
                one / rabbit_one,
                two / rabbit_two,
                rs / rabbit_rs
            );
        }
        if let Some(mqic) = &mqic {
            let rabbit = rt.block_on(measure(&rabbit_url, secs));
            print_figures("RabbitMQ", &rabbit);
            println!(
                "ratio transient throughput mqic/RabbitMQ: {:.2}x (target >= 4x)",
                mqic.consumed / rabbit.consumed
            );
            println!(
                "ratio latency (lapin) p50 mqic/RabbitMQ: {:.2}, p99: {:.2} (target p99 <= 0.25)",
                mqic.p50_ms / rabbit.p50_ms,
                mqic.p99_ms / rabbit.p99_ms
            );
            println!(
                "ratio latency (amqprs) p50 mqic/RabbitMQ: {:.2}, p99: {:.2} (target p99 <= 0.25)",
                mqic.amqprs_p50_ms / rabbit.amqprs_p50_ms,
                mqic.amqprs_p99_ms / rabbit.amqprs_p99_ms
            );
        }
    }
    println!("targets: idle RSS <= 13 MB, start to accepting <= 50 ms, RSS with 1M persistent messages queued <= 150 MB");
}

fn print_persistent(name: &str, rate: f64, publishers: usize) {
    println!(
        "{name} persistent throughput: {rate:.0} msg/s confirmed (durable queue, delivery_mode 2, {BODY} B, {publishers} publisher(s) on their own connections, confirm window {CONFIRM_WINDOW} each)"
    );
}

fn print_persistent_amqprs(name: &str, rate: f64) {
    println!(
        "{name} persistent throughput (amqprs client): {rate:.0} msg/s confirmed (durable queue, delivery_mode 2, {BODY} B, 1 publisher, confirm window {CONFIRM_WINDOW})"
    );
}

const CONFIRM_WINDOW: usize = 256;

/// Publishes persistent messages to durable `queue` with confirms (window 256) until `stop`
/// or `limit` messages are confirmed; returns the number confirmed.
async fn publish_confirmed(
    ch: &lapin::Channel,
    queue: &str,
    limit: u64,
    stop: Arc<AtomicBool>,
) -> u64 {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![b'p'; BODY];
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut window = std::collections::VecDeque::with_capacity(CONFIRM_WINDOW);
    let (mut sent, mut confirmed) = (0u64, 0u64);
    loop {
        let done = stop.load(Ordering::Relaxed) || sent >= limit;
        if window.len() >= CONFIRM_WINDOW || (done && !window.is_empty()) {
            let c: lapin::PublisherConfirm = window.pop_front().unwrap();
            let got = c.await.expect("confirm");
            assert!(got.is_ack(), "persistent publish nacked");
            confirmed += 1;
            continue;
        }
        if done {
            return confirmed;
        }
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await
            .expect("publish");
        window.push_back(c);
        sent += 1;
    }
}

async fn declare_durable(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Confirmed persistent messages per second over `secs` (after 1 s of warm-up), from
/// `publishers` publishers on their own connections.
async fn persistent_confirms(url: &str, secs: u64, publishers: usize) -> f64 {
    let queue = format!("bench-persistent-{}", std::process::id());
    let setup = connect(url).await;
    let ch = setup.create_channel().await.unwrap();
    declare_durable(&ch, &queue).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..publishers {
        let conn = connect(url).await;
        let pch = conn.create_channel().await.unwrap();
        conns.push(conn);
        let (queue, stop) = (queue.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            // Warm-up: one second's worth, uncounted.
            let warm = Arc::new(AtomicBool::new(false));
            let w = warm.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.store(true, Ordering::Relaxed);
            });
            publish_confirmed(&pch, &queue, u64::MAX, warm).await;
            let t0 = Instant::now();
            let n = publish_confirmed(&pch, &queue, u64::MAX, stop).await;
            n as f64 / t0.elapsed().as_secs_f64()
        }));
    }
    tokio::time::sleep(Duration::from_secs(1 + secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut rate = 0.0;
    for t in tasks {
        rate += t.await.unwrap();
    }
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    for conn in conns.iter().chain([&setup]) {
        let _ = conn.close(200, "done".into()).await;
    }
    rate
}

/// Publishes `count` persistent messages, reports the RSS with them queued, restarts mqic
/// on the same data dir and times the recovery.
fn recovery(rt: &tokio::runtime::Runtime, count: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, _) = start_mqic_in(dir.path());
    let queue = "bench-recovery";
    let t0 = Instant::now();
    rt.block_on(async {
        let conn = connect(&url).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, queue).await;
        let n = publish_confirmed(&ch, queue, count, Arc::new(AtomicBool::new(false))).await;
        assert_eq!(n, count);
        let _ = conn.close(200, "done".into()).await;
    });
    let publish_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(child.id());
    println!(
        "mqic published {count} persistent {BODY} B messages with confirms in {publish_s:.1} s ({:.0} msg/s)",
        count as f64 / publish_s
    );
    println!(
        "mqic RSS with {count} persistent messages queued: {:.1} MB",
        rss as f64 / 1024.0
    );
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let store = dir.path().join("broker.redb");
    let size = std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
    println!("broker.redb size: {:.1} MB", size as f64 / 1e6);

    let t0 = Instant::now();
    let (mut child, url, accept_ms) = start_mqic_in(dir.path());
    let (ready_ms, first_ms) = rt.block_on(async {
        let conn = connect(&url).await;
        let ch = conn.create_channel().await.unwrap();
        let ready = declare_durable(&ch, queue).await;
        assert_eq!(ready as u64, count, "every message is back");
        let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        assert!(got.is_some());
        let first_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let _ = conn.close(200, "done".into()).await;
        (ready_ms, first_ms)
    });
    let rss_after = rss_kib(child.id());
    println!(
        "mqic recovery of {count} persistent messages: accepting after {accept_ms:.0} ms, queue reports all ready after {ready_ms:.0} ms, first consumed after {first_ms:.0} ms"
    );
    println!(
        "mqic RSS after recovering {count} persistent messages: {:.1} MB",
        rss_after as f64 / 1024.0
    );
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

fn print_figures(name: &str, f: &Figures) {
    println!(
        "{name} transient throughput: {:.0} msg/s consumed, {:.0} msg/s published (2 producers, 2 consumers, {BODY} B, prefetch {PREFETCH}, multi-ack every {ACK_EVERY})",
        f.consumed, f.published
    );
    println!(
        "{name} latency at {LATENCY_RATE} msg/s (lapin): p50 {:.3} ms, p99 {:.3} ms",
        f.p50_ms, f.p99_ms
    );
    println!(
        "{name} latency at {LATENCY_RATE} msg/s (amqprs): p50 {:.3} ms, p99 {:.3} ms",
        f.amqprs_p50_ms, f.amqprs_p99_ms
    );
}

/// Starts the release `mqic serve` on a free port; returns the child, its URL and the
/// milliseconds from spawn to the first accepted TCP connection.
fn start_mqic() -> (Child, String, f64, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, ms) = start_mqic_in(dir.path());
    (child, url, ms, dir)
}

/// [`start_mqic`] on a given data dir.
fn start_mqic_in(data: &std::path::Path) -> (Child, String, f64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_mqic"))
        .args(["serve", "--amqp-listen", &addr])
        .args(["--management-listen", "127.0.0.1:0"])
        .args(["--prometheus-listen", "127.0.0.1:0"])
        .args(["--web-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        // `MQIC_BENCH_MQIC_LOG=mqic::amqp::store=debug` shows the store writer's batches.
        .env(
            "RUST_LOG",
            std::env::var("MQIC_BENCH_MQIC_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("mqic starts");
    loop {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            panic!("mqic did not accept connections within 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    (child, format!("amqp://guest:guest@{addr}/%2f"), ms)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect")
}

async fn measure(url: &str, secs: u64) -> Figures {
    let (published, consumed) = throughput(url, secs).await;
    let (p50_ms, p99_ms) = latency(url).await;
    let (amqprs_p50_ms, amqprs_p99_ms) = latency_amqprs(url).await;
    Figures {
        published,
        consumed,
        p50_ms,
        p99_ms,
        amqprs_p50_ms,
        amqprs_p99_ms,
    }
}

async fn throughput(url: &str, secs: u64) -> (f64, f64) {
    let queue = format!("bench-tp-{}", std::process::id());
    let setup = connect(url).await;
    let ch = setup.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut consumer_conns = Vec::new();
    for _ in 0..2 {
        let conn = connect(url).await;
        let ch = conn.create_channel().await.unwrap();
        consumer_conns.push(conn);
        let (consumed, queue) = (consumed.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            ch.basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .unwrap();
            let mut deliveries = ch
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let mut since_ack = 0;
            // Ends when the connection is closed after the measured window.
            while let Some(Ok(d)) = deliveries.next().await {
                consumed.fetch_add(1, Ordering::Relaxed);
                since_ack += 1;
                if since_ack >= ACK_EVERY {
                    if ch
                        .basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    since_ack = 0;
                }
            }
        }));
    }
    let mut producer_conns = Vec::new();
    for _ in 0..2 {
        let conn = connect(url).await;
        let ch = conn.create_channel().await.unwrap();
        producer_conns.push(conn);
        // lapin resolves a publish once its frames are written; keeping PIPELINE publishes
        // in flight per connection measures the broker rather than that round trip.
        for _ in 0..PIPELINE {
            let (stop, published, queue, ch) =
                (stop.clone(), published.clone(), queue.clone(), ch.clone());
            tasks.push(tokio::spawn(async move {
                let body = vec![b'x'; BODY];
                while !stop.load(Ordering::Relaxed) {
                    let sent = ch
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            BasicProperties::default(),
                        )
                        .await;
                    if sent.is_err() {
                        break;
                    }
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    // One second of warm-up, then the measured window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p0, c0, t0) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let (p1, c1) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    for conn in producer_conns.iter().chain(&consumer_conns) {
        let _ = conn.close(200, "done".into()).await;
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = setup.close(200, "done".into()).await;
    ((p1 - p0) as f64 / elapsed, (c1 - c0) as f64 / elapsed)
}

async fn latency(url: &str) -> (f64, f64) {
    let queue = format!("bench-lat-{}", std::process::id());
    let conn = connect(url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let pacer = Pacer::new();
    let total = LATENCY_RATE * LATENCY_SECS;
    let consumer_conn = connect(url).await;
    let cch = consumer_conn.create_channel().await.unwrap();
    let mut deliveries = cch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let collector = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        while (samples.len() as u64) < total {
            let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(5), deliveries.next()).await
            else {
                break;
            };
            samples.push(pacer.latency_of(&d.data));
        }
        samples
    });
    let mut body = vec![0u8; BODY];
    for i in 0..total {
        pacer.wait_turn(i).await;
        pacer.stamp(&mut body);
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let samples = collector.await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    let _ = consumer_conn.close(200, "done".into()).await;
    p50_p99(samples)
}

/// Paces sends at `LATENCY_RATE` and stamps each body with its send time (nanoseconds
/// since the pacer's epoch, in the first 8 bytes), so the consumer can compute latency.
#[derive(Clone, Copy)]
struct Pacer {
    epoch: Instant,
}

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            epoch: Instant::now(),
        }
    }

    /// Sleeps until the `i`-th send slot.
    async fn wait_turn(&self, i: u64) {
        let interval = Duration::from_nanos(1_000_000_000 / LATENCY_RATE);
        let due = self.epoch + interval * i as u32;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn stamp(&self, body: &mut [u8]) {
        body[..8].copy_from_slice(&self.now().to_be_bytes());
    }

    fn latency_of(&self, body: &[u8]) -> u64 {
        self.now() - u64::from_be_bytes(body[..8].try_into().unwrap())
    }
}

/// p50 and p99 of latency samples in nanoseconds, as milliseconds.
fn p50_p99(mut samples: Vec<u64>) -> (f64, f64) {
    samples.sort_unstable();
    let pick =
        |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)] as f64 / 1e6;
    (pick(0.50), pick(0.99))
}

/// host, port, user, password from `amqp://user:pass@host:port/...`.
fn parse_url(url: &str) -> (String, u16, String, String) {
    let rest = url.strip_prefix("amqp://").expect("amqp:// URL");
    let (auth, rest) = rest.split_once('@').expect("user:pass@ in URL");
    let (user, pass) = auth.split_once(':').expect("user:pass");
    let hostport = rest.split('/').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').expect("host:port");
    (host.into(), port.parse().unwrap(), user.into(), pass.into())
}

/// The latency load again with the amqprs client, for a second opinion on client noise.
async fn latency_amqprs(url: &str) -> (f64, f64) {
    use amqprs::channel::{
        BasicConsumeArguments, BasicPublishArguments, QueueDeclareArguments, QueueDeleteArguments,
    };
    use amqprs::connection::{Connection as RsConnection, OpenConnectionArguments};
    let (host, port, user, pass) = parse_url(url);
    let args = OpenConnectionArguments::new(&host, port, &user, &pass);
    let queue = format!("bench-lat-rs-{}", std::process::id());
    let conn = RsConnection::open(&args).await.unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::new(&queue))
        .await
        .unwrap();
    let cconn = RsConnection::open(&args).await.unwrap();
    let cch = cconn.open_channel(None).await.unwrap();
    let (_tag, mut rx) = cch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "lat")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let pacer = Pacer::new();
    let total = LATENCY_RATE * LATENCY_SECS;
    let collector = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        while (samples.len() as u64) < total {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await else {
                break;
            };
            samples.push(pacer.latency_of(&m.content.unwrap_or_default()));
        }
        samples
    });
    for i in 0..total {
        pacer.wait_turn(i).await;
        let mut body = vec![0u8; BODY];
        pacer.stamp(&mut body);
        ch.basic_publish(
            amqprs::BasicProperties::default(),
            body,
            BasicPublishArguments::new("", &queue),
        )
        .await
        .unwrap();
    }
    let samples = collector.await.unwrap();
    let _ = ch.queue_delete(QueueDeleteArguments::new(&queue)).await;
    let _ = ch.close().await;
    let _ = cch.close().await;
    let _ = conn.close().await;
    let _ = cconn.close().await;
    p50_p99(samples)
}

/// Counts amqprs's publisher confirms and gives their window permits back.
struct RsConfirms {
    window: Arc<tokio::sync::Semaphore>,
    confirmed: Arc<AtomicU64>,
    nacked: Arc<AtomicBool>,
    last: u64,
}

impl RsConfirms {
    fn settle(&mut self, tag: u64, multiple: bool) -> usize {
        let n = if multiple {
            tag.saturating_sub(self.last)
        } else {
            1
        };
        self.last = self.last.max(tag);
        self.window.add_permits(n as usize);
        n as usize
    }
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for RsConfirms {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        close: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        panic!("channel closed by the broker: {close}");
    }
    async fn cancel(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &amqprs::channel::Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        let n = self.settle(ack.delivery_tag(), ack.mutiple());
        self.confirmed.fetch_add(n as u64, Ordering::Relaxed);
    }
    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        self.nacked.store(true, Ordering::Relaxed);
        self.settle(nack.delivery_tag(), nack.multiple());
    }
    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

/// The persistent confirm load (durable queue, delivery_mode 2, 512 B, one publisher,
/// window 256) driven by amqprs instead of lapin: a second client, lighter on the CPU that the
/// client and the broker share on a small machine. Confirmed messages per second over `secs`
/// after 1 s of warm-up.
async fn persistent_confirms_amqprs(url: &str, secs: u64) -> f64 {
    use amqprs::channel::{
        BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments,
    };
    use amqprs::connection::{Connection as RsConnection, OpenConnectionArguments};
    let (host, port, user, pass) = parse_url(url);
    let args = OpenConnectionArguments::new(&host, port, &user, &pass);
    let queue = format!("bench-persistent-rs-{}", std::process::id());
    let conn = RsConnection::open(&args).await.unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await
        .unwrap();
    let window = Arc::new(tokio::sync::Semaphore::new(CONFIRM_WINDOW));
    let confirmed = Arc::new(AtomicU64::new(0));
    let nacked = Arc::new(AtomicBool::new(false));
    ch.register_callback(RsConfirms {
        window: window.clone(),
        confirmed: confirmed.clone(),
        nacked: nacked.clone(),
        last: 0,
    })
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let props = amqprs::BasicProperties::default()
        .with_delivery_mode(2)
        .finish();
    let publish = BasicPublishArguments::new("", &queue);
    let start = Instant::now();
    let end = start + Duration::from_secs(1 + secs);
    let mut base = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if base.is_none() && now >= start + Duration::from_secs(1) {
            base = Some((now, confirmed.load(Ordering::Relaxed)));
        }
        window.acquire().await.unwrap().forget();
        ch.basic_publish(props.clone(), vec![b'p'; BODY], publish.clone())
            .await
            .unwrap();
    }
    // Every publish confirmed before the clock stops.
    window
        .acquire_many(CONFIRM_WINDOW as u32)
        .await
        .unwrap()
        .forget();
    let (t0, c0) = base.expect("ran past the warm-up");
    let rate = (confirmed.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();
    assert!(!nacked.load(Ordering::Relaxed), "persistent publish nacked");
    let _ = ch.queue_delete(QueueDeleteArguments::new(&queue)).await;
    let _ = ch.close().await;
    let _ = conn.close().await;
    rate
}
