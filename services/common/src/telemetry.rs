//! Logs and traces: `tracing` everywhere, exported over OTLP when configured.
//!
//! - `RUST_LOG` sets the filter (default `info`); `LOG_FORMAT=json` gives JSON lines.
//! - Traces go to an OTLP/gRPC collector only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER`/`_ARG` are honoured by the SDK.
//!   Export is batched, so a slow or absent collector never blocks a request.
//! - The W3C trace-context propagator is installed for calls between services.
//! - Spans the exporter cannot deliver (collector down) are dropped, never queued without
//!   bound, and counted in `switchboard_otel_spans_dropped_total`.
//! - JSON log lines carry the `trace_id` and `span_id` of the span they were logged in,
//!   so a log line leads to its trace in Jaeger.
//! - Each process reports `service.instance.id` (`$HOSTNAME-<pid>`, the pod name in
//!   Kubernetes) unless `OTEL_RESOURCE_ATTRIBUTES` sets one, so instances of one service
//!   are told apart.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::dispatcher::WeakDispatch;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Environment variables read for logs and traces, by this module or by the OpenTelemetry
/// SDK, with what each does. They have no flag; `--help` lists them after the flags
/// ([`env_help`]), and the deploy tests accept exactly these besides the flags' variables.
pub const ENV: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "log filter (default info), e.g. info,switchboard_auth=debug",
    ),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP/gRPC collector for traces; unset = no export",
    ),
    (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "the same, for traces only",
    ),
    (
        "OTEL_SERVICE_NAME",
        "service name in traces (default switchboard-<service>)",
    ),
    (
        "OTEL_RESOURCE_ATTRIBUTES",
        "extra resource attributes, k=v,k=v",
    ),
    (
        "OTEL_TRACES_SAMPLER",
        "sampler (default parentbased_always_on)",
    ),
    (
        "OTEL_TRACES_SAMPLER_ARG",
        "the sampler's argument, e.g. 0.1",
    ),
    (
        "OTEL_BSP_SCHEDULE_DELAY",
        "batch export interval in ms (default 5000)",
    ),
    (
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "spans waiting for export (default 2048); beyond, dropped",
    ),
];

/// The `--help` section listing [`ENV`].
pub fn env_help() -> String {
    let width = ENV.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut help = String::from("Telemetry (environment only):\n");
    for (name, meaning) in ENV {
        help.push_str(&format!("  {name:<width$}  {meaning}\n"));
    }
    help
}

/// Keeps the trace exporter alive; [`Guard::shutdown`] (or drop) flushes pending spans.
#[must_use = "dropping the guard stops trace export"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Flushes pending spans and stops the exporter.
    pub fn shutdown(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.flush();
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs the global subscriber for `service` (the default `service.name`).
///
/// Safe to call more than once (tests): later calls keep the first subscriber.
pub fn init(service: &'static str, format: LogFormat) -> anyhow::Result<Guard> {
    let dispatch: Arc<OnceLock<WeakDispatch>> = Arc::default();
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Text => {
            // Colour only for a person at a terminal, never in files or collectors.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none();
            tracing_subscriber::fmt::layer()
                .with_target(true)
                .with_ansi(ansi)
                .boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(JsonWithTrace {
                inner: tracing_subscriber::fmt::format().json().flatten_event(true),
                dispatch: dispatch.clone(),
            })
            .boxed(),
    };
    let provider = if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let exporter = CountingExporter(exporter);
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(service);
        }
        let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
        if !attributes.contains("service.instance.id=") {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
            resource = resource.with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                format!("{host}-{}", std::process::id()),
            ));
        }
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build(),
        )
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(filter())
    });
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init();
    if installed.is_err() {
        tracing::debug!("a tracing subscriber was already installed; keeping it");
    } else {
        let _ = dispatch.set(tracing::dispatcher::get_default(|d| d.downgrade()));
    }
    Ok(Guard { provider })
}

/// The OTLP exporter, counting the spans of every batch it fails to deliver.
#[derive(Debug)]
struct CountingExporter<E>(E);

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.0.export(batch).await;
        if result.is_err() {
            metrics::counter!(crate::metrics::SPANS_DROPPED).increment(spans);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}

/// tracing-subscriber's JSON lines plus the OpenTelemetry `trace_id` and `span_id` of the
/// span the event happened in.
struct JsonWithTrace {
    inner: Format<Json>,
    /// The installed subscriber, which holds the OpenTelemetry span data.
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl JsonWithTrace {
    fn ids<S>(
        &self,
        ctx: &FmtContext<'_, S, impl for<'w> FormatFields<'w> + 'static>,
        event: &Event<'_>,
    ) -> Option<(String, String)>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let id = event
            .parent()
            .cloned()
            .or_else(|| ctx.lookup_current().map(|s| s.id()))?;
        let dispatch = self.dispatch.get()?.upgrade()?;
        let cx = tracing_opentelemetry::get_otel_context(&id, &dispatch)?;
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let object = line.trim_end().strip_suffix('}');
        match (object, self.ids(ctx, event)) {
            (Some(head), Some((trace_id, span_id))) => writeln!(
                writer,
                "{head},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            _ => writer.write_str(&line),
        }
    }
}
