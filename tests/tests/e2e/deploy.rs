//! The deploy manifests, read back: the kustomize overlays as `kubectl apply -k` would
//! send them, the compose file, the Dockerfile and the Secret template. Schema validation
//! (unknown fields) is `make deploy-check`'s job; these tests hold the rules and the drift
//! checks against the services' own settings, and show that each rule can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use switchboard_tests::deploy::{
    Service, allows, compose_problems, compose_services, compose_unread_variables, containers,
    environment, image_tag, object, objects, parse, pod_labels, policy_problems, read, render,
    secret_keys, unread_variables,
};
use yaml_rust2::Yaml;

const OVERLAYS: &[&str] = &["dev", "prod", "cluster", "managed-cluster"];

fn rendered(overlay: &str) -> (String, Vec<Yaml>) {
    let text = render(overlay).expect("render the overlay");
    let docs = parse(&text).expect("parse the rendered overlay");
    (text, docs)
}

fn compose() -> Yaml {
    let text = read("deploy/compose.yaml").expect("compose file");
    parse(&text).expect("compose YAML").remove(0)
}

/// What `check` reports once `from` (which `text` must hold) is replaced by `to`.
fn reported_after(
    text: &str,
    from: &str,
    to: &str,
    check: impl Fn(&[Yaml]) -> Vec<String>,
) -> Vec<String> {
    assert!(text.contains(from), "{from:?} is not in the text");
    check(&parse(&text.replace(from, to)).expect("still YAML"))
}

/// For each `(from, to, expected)`: replacing `from` by `to` makes `check` report `expected`.
fn assert_each_reported(
    text: &str,
    cases: &[(&str, &str, &str)],
    check: impl Fn(&[Yaml]) -> Vec<String>,
) {
    for (from, to, expected) in cases {
        let problems = reported_after(text, from, to, &check);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{from:?} -> {to:?} should report {expected:?}, got {problems:?}"
        );
    }
}

#[test]
fn rendered_overlays_follow_the_deploy_rules() {
    for overlay in OVERLAYS {
        let (_, docs) = rendered(overlay);
        let services: Vec<Service> = containers(&docs)
            .iter()
            .filter_map(|c| c.service())
            .collect();
        assert_eq!(
            services.len(),
            3,
            "{overlay}: one container per service: {services:?}"
        );
        let problems = policy_problems(&docs);
        assert!(problems.is_empty(), "{overlay}:\n{}", problems.join("\n"));
    }
}

/// Each rule, broken once in an otherwise good rendering, is reported.
#[test]
fn each_deploy_rule_catches_its_violation() {
    let (text, docs) = rendered("dev");
    assert!(policy_problems(&docs).is_empty());
    let cases: &[(&str, &str, &str)] = &[
        (
            "image: switchboard:0.1.0",
            "image: switchboard:latest",
            "is not pinned",
        ),
        ("image: redis:7.2.7", "image: redis", "is not pinned"),
        ("runAsUser: 65532", "runAsUser: 0", "may run as root"),
        (
            "runAsNonRoot: true",
            "runAsNonRoot: false",
            "may run as root",
        ),
        ("readinessProbe:", "readinessGate:", "no readinessProbe"),
        ("livenessProbe:", "livenessGate:", "no livenessProbe"),
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
            "writable",
        ),
        (
            "allowPrivilegeEscalation: false",
            "allowPrivilegeEscalation: true",
            "allowPrivilegeEscalation",
        ),
        ("- ALL", "- NET_RAW", "capabilities"),
        (
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: 20",
            "must exceed",
        ),
        (
            "SHUTDOWN_GRACE_SECS: \"20\"",
            "SHUTDOWN_GRACE_SECS: \"45\"",
            "must exceed",
        ),
        (
            "service: readiness",
            "service: liveness",
            "gRPC probe of service \"readiness\"",
        ),
        ("port: 50053\n", "port: 50054\n", "gRPC probe"),
        (
            "prometheus.io/port: \"9466\"",
            "prometheus.io/port: \"9999\"",
            "prometheus.io/scrape",
        ),
        ("  clusterIP: None\n", "", "headless Service"),
        ("memory: 1Gi", "storage: 1Gi", "resources.limits.memory"),
        (
            "topologySpreadConstraints:",
            "topologySpread:",
            "topologySpreadConstraints",
        ),
        (
            "  name: switchboard-messaging\n  namespace:",
            "  name: switchboard-gone\n  namespace:",
            "is not rendered",
        ),
    ];
    assert_each_reported(&text, cases, policy_problems);
}

/// Settings the manifests leave unset on purpose (deploy/k8s/base/config.yaml says why).
const UNSET_ON_PURPOSE: &[&str] = &[
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// The two ways to name the Redis: each service gets exactly one of them.
const REDIS_CHOICE: [&str; 2] = ["REDIS_URL", "REDIS_CLUSTER_URLS"];

#[test]
fn manifests_set_every_setting_and_only_settings_the_services_read() {
    assert!(Service::Auth.reads().contains("AUTH_SIGNING_KEY_FILE"));
    assert!(Service::Messaging.reads().contains("SERVICE_TOKEN"));
    assert!(!Service::Auth.reads().contains("SERVICE_TOKEN"));
    assert!(
        Service::Presence
            .reads()
            .contains("OTEL_EXPORTER_OTLP_ENDPOINT")
    );
    for overlay in OVERLAYS {
        let (text, docs) = rendered(overlay);
        let unread = unread_variables(&docs);
        assert!(unread.is_empty(), "{overlay}:\n{}", unread.join("\n"));
        for c in containers(&docs) {
            let Some(service) = c.service() else { continue };
            let env = environment(&docs, &c).expect("environment");
            let missing: Vec<String> = service
                .reads()
                .into_iter()
                .filter(|v| !env.contains_key(v) && !UNSET_ON_PURPOSE.contains(&v.as_str()))
                .filter(|v| !REDIS_CHOICE.contains(&v.as_str()))
                .collect();
            assert!(
                missing.is_empty(),
                "{overlay} {service:?} does not set {missing:?}"
            );
            let redis: Vec<&str> = REDIS_CHOICE
                .into_iter()
                .filter(|v| env.contains_key(*v))
                .collect();
            assert_eq!(
                redis.len(),
                1,
                "{overlay} {service:?} names its Redis by {redis:?}"
            );
        }
        // A misspelt setting is caught (it would be silently ignored by the service).
        // So is a service's setting given to another service.
        assert_each_reported(
            &text,
            &[
                (
                    "  MESSAGING_SEND_BURST:",
                    "  MESSAGING_SEND_BURTS:",
                    "MESSAGING_SEND_BURTS",
                ),
                ("  PRESENCE_TTL_SECS:", "  AUTH_TTL:", "AUTH_TTL"),
            ],
            unread_variables,
        );
    }
    let compose_text = read("deploy/compose.yaml").expect("compose");
    let unread = compose_unread_variables(&compose());
    assert!(unread.is_empty(), "compose:\n{}", unread.join("\n"));
    let problems = reported_after(&compose_text, "  REDIS_URL:", "  REDIS_ULR:", |docs| {
        compose_unread_variables(&docs[0])
    });
    assert_eq!(
        problems.len(),
        6,
        "every compose instance inherits the typo: {problems:?}"
    );
}

#[test]
fn secret_template_names_every_key_the_pods_read_and_holds_no_secret() {
    let text = read("deploy/k8s/secret.template.yaml").expect("template");
    let template = parse(&text).expect("YAML").remove(0);
    assert_eq!(template["kind"].as_str(), Some("Secret"));
    let name = template["metadata"]["name"].as_str().expect("name");
    let data = template["stringData"].as_hash().expect("stringData");
    let template_keys: BTreeSet<String> = data
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    for (key, value) in data {
        let value = value.as_str().unwrap_or("");
        assert!(
            value.contains("REPLACE-ME"),
            "{key:?} must be a placeholder, is {value:?}"
        );
    }
    assert!(
        !text.contains("PRIVATE KEY"),
        "a key is committed in the template"
    );
    for overlay in OVERLAYS {
        let (_, docs) = rendered(overlay);
        assert!(
            objects(&docs, "Secret").is_empty(),
            "{overlay} renders a Secret: real ones are created by hand"
        );
        let keys = secret_keys(&docs);
        assert!(keys.len() >= 4, "{keys:?}");
        for (secret, key) in keys {
            assert_eq!(secret, name, "{overlay} reads another Secret");
            assert!(
                template_keys.contains(&key),
                "{overlay} reads {key}, not in the template"
            );
        }
    }
}

/// The cluster overlay: six Redis nodes in cluster mode and the Job that forms them, the
/// services on REDIS_CLUSTER_URLS naming those nodes, messaging waiting for a replica, and
/// the network paths the cluster needs (and no more).
#[test]
fn the_cluster_overlay_runs_six_redis_nodes_formed_by_a_job() {
    let (_, docs) = rendered("cluster");
    assert!(
        object(&docs, "StatefulSet", "redis").is_none(),
        "one Redis is gone"
    );
    assert!(object(&docs, "Service", "redis").is_none());
    let nodes = object(&docs, "StatefulSet", "redis-cluster").expect("the cluster's nodes");
    assert_eq!(nodes["spec"]["replicas"].as_i64(), Some(6));
    let args: Vec<&str> = nodes["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| *a == name)
            .and_then(|i| args.get(i + 1).copied())
    };
    assert_eq!(flag("--cluster-enabled"), Some("yes"));
    assert_eq!(flag("--cluster-config-file"), Some("/data/nodes.conf"));
    assert_eq!(flag("--appendonly"), Some("yes"));
    let service = nodes["spec"]["serviceName"].as_str().expect("serviceName");
    assert!(
        object(&docs, "Service", service).is_some(),
        "headless {service}"
    );
    let job = object(&docs, "Job", "redis-cluster-create").expect("the forming Job");
    let script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        .as_str()
        .expect("script");
    assert!(
        script.contains("redis-cli --cluster create") && script.contains("--cluster-replicas 1"),
        "{script}"
    );
    let env = &job["spec"]["template"]["spec"]["containers"][0]["env"];
    let nodes_to_form = env
        .as_vec()
        .and_then(|e| e.iter().find(|v| v["name"].as_str() == Some("REDIS_NODES")))
        .and_then(|v| v["value"].as_str())
        .expect("the Job's REDIS_NODES");
    let expected: Vec<String> = (0..6)
        .map(|i| format!("redis-cluster-{i}.{service}:6379"))
        .collect();
    assert_eq!(
        nodes_to_form.split_whitespace().collect::<Vec<_>>(),
        expected,
        "the Job forms every node of the StatefulSet"
    );
    for c in containers(&docs) {
        let Some(svc) = c.service() else { continue };
        let env = environment(&docs, &c).expect("environment");
        let urls = env
            .get("REDIS_CLUSTER_URLS")
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("{svc:?} has no REDIS_CLUSTER_URLS"));
        for url in urls.split(',') {
            let host = url
                .trim_start_matches("redis://")
                .split(':')
                .next()
                .unwrap_or_default();
            let (pod, svc_name) = host.split_once('.').expect("pod.service");
            assert_eq!(svc_name, service, "{url} names a node of the StatefulSet");
            let n: u32 = pod
                .strip_prefix("redis-cluster-")
                .and_then(|n| n.parse().ok())
                .expect("a node's name");
            assert!(n < 6, "{url}");
        }
        if svc == Service::Messaging {
            assert_eq!(
                env.get("REDIS_ACK_REPLICAS").cloned().flatten().as_deref(),
                Some("1")
            );
        }
    }
    let pod = |kind: &str, name: &str| {
        let labels = pod_labels(&docs, kind, name);
        assert!(!labels.is_empty(), "{name} has pod labels");
        labels
    };
    let redis = pod("StatefulSet", "redis-cluster");
    let former = pod("Job", "redis-cluster-create");
    let [auth, presence, messaging] =
        ["auth", "presence", "messaging"].map(|n| pod("Deployment", n));
    let outside: Option<&BTreeMap<String, String>> = None;
    for (path, from, to, port) in [
        ("auth -> node", Some(&auth), Some(&redis), 6379),
        ("presence -> node", Some(&presence), Some(&redis), 6379),
        ("messaging -> node", Some(&messaging), Some(&redis), 6379),
        ("node -> node", Some(&redis), Some(&redis), 6379),
        ("node -> node, bus", Some(&redis), Some(&redis), 16379),
        ("Job -> node", Some(&former), Some(&redis), 6379),
    ] {
        assert!(
            allows(&docs, from, to, port),
            "{path} :{port} must be allowed"
        );
    }
    for (path, from, to, port) in [
        ("client -> node", outside, Some(&redis), 6379),
        ("messaging -> bus", Some(&messaging), Some(&redis), 16379),
        ("Job -> bus", Some(&former), Some(&redis), 16379),
        ("Job -> auth", Some(&former), Some(&auth), 50051),
        ("node -> outside", Some(&redis), outside, 6379),
    ] {
        assert!(
            !allows(&docs, from, to, port),
            "{path} :{port} must be denied"
        );
    }
}

/// The managed-cluster overlay: no Redis of its own, every service on REDIS_CLUSTER_URLS
/// from the Secret, messaging waiting for a replica, and the way out to the cluster open.
#[test]
fn the_managed_cluster_overlay_reads_its_urls_from_the_secret() {
    let (_, docs) = rendered("managed-cluster");
    assert!(
        object(&docs, "StatefulSet", "redis").is_none(),
        "no Redis pods"
    );
    assert!(object(&docs, "Service", "redis").is_none());
    for c in containers(&docs) {
        let Some(svc) = c.service() else { continue };
        let from_secret = c.container["env"].as_vec().and_then(|e| {
            e.iter()
                .find(|v| v["name"].as_str() == Some("REDIS_CLUSTER_URLS"))
                .map(|v| &v["valueFrom"]["secretKeyRef"])
        });
        let key = from_secret.and_then(|r| r["key"].as_str());
        assert_eq!(key, Some("redis-cluster-urls"), "{svc:?}");
        let env = environment(&docs, &c).expect("environment");
        assert!(
            !env.contains_key("REDIS_URL"),
            "{svc:?} still names one Redis"
        );
        if svc == Service::Messaging {
            assert_eq!(
                env.get("REDIS_ACK_REPLICAS").cloned().flatten().as_deref(),
                Some("1")
            );
        }
    }
    let outside: Option<&BTreeMap<String, String>> = None;
    for name in ["auth", "presence", "messaging"] {
        let pod = pod_labels(&docs, "Deployment", name);
        for port in [6379, 6380] {
            assert!(
                allows(&docs, Some(&pod), outside, port),
                "{name} -> cluster :{port}"
            );
        }
        assert!(
            !allows(&docs, Some(&pod), outside, 443),
            "{name} -> outside :443"
        );
    }
}

/// The forming Job's own script, run against six fresh local nodes: it forms a healthy
/// cluster of three masters with a replica each, and run again it changes nothing.
#[test]
fn the_cluster_forming_job_forms_six_nodes_once() {
    let (_, docs) = rendered("cluster");
    let job = object(&docs, "Job", "redis-cluster-create").expect("the forming Job");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let script = container["args"][0].as_str().expect("script");
    let cluster = switchboard_tests::redis::RedisCluster::spawn_unformed().expect("six nodes");
    let run = || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("REDIS_NODES", cluster.addresses().join(" "))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the Job's script failed:\n{text}");
        text
    };
    let first = run();
    assert!(first.contains("All 16384 slots covered"), "{first}");
    cluster
        .wait_until_ok(Duration::from_secs(20))
        .expect("a healthy cluster");
    let again = run();
    assert!(again.contains("formed already"), "{again}");
}

#[test]
fn network_policies_allow_only_the_paths_the_services_use() {
    let (_, docs) = rendered("dev");
    let pod = |name: &str| {
        let kind = if name == "redis" {
            "StatefulSet"
        } else {
            "Deployment"
        };
        let labels = pod_labels(&docs, kind, name);
        assert!(!labels.is_empty(), "{name} has pod labels");
        labels
    };
    let [auth, presence, messaging, redis, collector, jaeger] = [
        "auth",
        "presence",
        "messaging",
        "redis",
        "otel-collector",
        "jaeger",
    ]
    .map(pod);
    let outside: Option<&BTreeMap<String, String>> = None;
    let allowed = [
        ("client -> auth", outside, Some(&auth), 50051),
        ("client -> presence", outside, Some(&presence), 50052),
        ("client -> messaging", outside, Some(&messaging), 50053),
        ("prometheus -> auth", outside, Some(&auth), 9464),
        ("prometheus -> presence", outside, Some(&presence), 9465),
        ("prometheus -> messaging", outside, Some(&messaging), 9466),
        (
            "messaging -> presence",
            Some(&messaging),
            Some(&presence),
            50052,
        ),
        ("presence -> auth", Some(&presence), Some(&auth), 50051),
        ("messaging -> auth", Some(&messaging), Some(&auth), 50051),
        ("auth -> redis", Some(&auth), Some(&redis), 6379),
        ("presence -> redis", Some(&presence), Some(&redis), 6379),
        ("messaging -> redis", Some(&messaging), Some(&redis), 6379),
        ("auth -> collector", Some(&auth), Some(&collector), 4317),
        (
            "presence -> collector",
            Some(&presence),
            Some(&collector),
            4317,
        ),
        (
            "messaging -> collector",
            Some(&messaging),
            Some(&collector),
            4317,
        ),
        ("collector -> jaeger", Some(&collector), Some(&jaeger), 4317),
        ("user -> jaeger UI", outside, Some(&jaeger), 16686),
    ];
    for (path, from, to, port) in allowed {
        assert!(
            allows(&docs, from, to, port),
            "{path} :{port} must be allowed"
        );
    }
    let denied = [
        ("client -> redis", outside, Some(&redis), 6379),
        ("client -> collector", outside, Some(&collector), 4317),
        ("client -> jaeger OTLP", outside, Some(&jaeger), 4317),
        ("auth -> presence", Some(&auth), Some(&presence), 50052),
        ("auth -> messaging", Some(&auth), Some(&messaging), 50053),
        (
            "presence -> messaging",
            Some(&presence),
            Some(&messaging),
            50053,
        ),
        ("redis -> auth", Some(&redis), Some(&auth), 50051),
        (
            "messaging -> redis, other port",
            Some(&messaging),
            Some(&redis),
            6380,
        ),
        ("jaeger -> redis", Some(&jaeger), Some(&redis), 6379),
        ("auth -> outside", Some(&auth), outside, 443),
    ];
    for (path, from, to, port) in denied {
        assert!(
            !allows(&docs, from, to, port),
            "{path} :{port} must be denied"
        );
    }
}

fn replicas(docs: &[Yaml], name: &str) -> i64 {
    object(docs, "Deployment", name).expect(name)["spec"]["replicas"]
        .as_i64()
        .expect("replicas")
}

const SERVICES: [&str; 3] = ["auth", "presence", "messaging"];

#[test]
fn dev_runs_one_of_each_with_jaeger_and_prod_scales_and_is_protected() {
    let (_, dev) = rendered("dev");
    for name in SERVICES {
        assert_eq!(replicas(&dev, name), 1, "dev {name}");
    }
    let jaeger = object(&dev, "Deployment", "jaeger").expect("dev has Jaeger");
    let ports: Vec<i64> = jaeger["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert!(ports.contains(&4317) && ports.contains(&16686), "{ports:?}");
    let backend = |docs: &[Yaml]| {
        object(docs, "ConfigMap", "otel-collector").expect("collector config")["data"]
            ["TRACES_BACKEND"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(backend(&dev).as_deref(), Some("jaeger:4317"));
    let collector_config =
        object(&dev, "ConfigMap", "otel-collector").expect("config")["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml")
            .to_owned();
    let collector = parse(&collector_config).expect("collector YAML").remove(0);
    assert_eq!(
        collector["exporters"]["otlp"]["endpoint"].as_str(),
        Some("${env:TRACES_BACKEND}")
    );
    assert_eq!(
        collector["service"]["pipelines"]["traces"]["exporters"][0].as_str(),
        Some("otlp")
    );

    let (_, prod) = rendered("prod");
    assert!(object(&prod, "Deployment", "jaeger").is_none());
    assert_ne!(backend(&prod).as_deref(), Some("jaeger:4317"));
    for name in SERVICES {
        assert!(replicas(&prod, name) >= 2, "prod {name}");
        let hpa = object(&prod, "HorizontalPodAutoscaler", name).expect("HPA");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some(name));
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["kind"].as_str(),
            Some("Deployment")
        );
        let min = hpa["spec"]["minReplicas"].as_i64().expect("minReplicas");
        assert!(min >= 2 && hpa["spec"]["maxReplicas"].as_i64() > Some(min));
        let pdb = object(&prod, "PodDisruptionBudget", name).expect("PDB");
        let labels = pod_labels(&prod, "Deployment", name);
        let selector = pdb["spec"]["selector"]["matchLabels"]
            .as_hash()
            .expect("selector");
        assert!(!selector.is_empty());
        for (k, v) in selector {
            assert_eq!(
                labels.get(k.as_str().unwrap_or("")).map(String::as_str),
                v.as_str()
            );
        }
    }
    let redis = object(&prod, "StatefulSet", "redis").expect("redis");
    let command = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_vec()
        .expect("args");
    let args: Vec<&str> = command.iter().filter_map(Yaml::as_str).collect();
    assert!(
        args.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "{args:?}"
    );
    assert!(
        !redis["spec"]["volumeClaimTemplates"][0].is_badvalue(),
        "AOF on a PVC"
    );
}

/// `ARG BINS="--bin a --bin b"` of the Dockerfile: the binaries the image holds.
fn image_binaries(dockerfile: &str) -> BTreeSet<String> {
    let value = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG BINS="))
        .expect("ARG BINS in the Dockerfile");
    value
        .trim_matches('"')
        .split_whitespace()
        .filter(|w| *w != "--bin")
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_image_holds_every_binary_the_manifests_run_and_is_pinned_and_non_root() {
    let dockerfile = read("deploy/docker/Dockerfile").expect("Dockerfile");
    let bins = image_binaries(&dockerfile);
    let expected: BTreeSet<String> = [
        "switchboard-auth",
        "switchboard-presence",
        "switchboard-messaging",
        "switchboard-server",
        "switchboard",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(bins, expected);
    for bin in &bins {
        let found = ["auth", "presence", "messaging", "server", "cli"]
            .iter()
            .any(|c| {
                read(&format!("services/{c}/Cargo.toml"))
                    .is_ok_and(|t| t.contains(&format!("name = \"{bin}\"")))
            });
        assert!(found, "{bin} is a binary of the workspace");
    }
    // Every FROM names a tag (or a stage); none is `latest`.
    let args: BTreeMap<&str, &str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ARG "))
        .filter_map(|a| a.split_once('='))
        .collect();
    let mut stages = BTreeSet::new();
    for line in dockerfile.lines().filter(|l| l.starts_with("FROM ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut image = words[1].to_owned();
        for (k, v) in &args {
            image = image.replace(&format!("${{{k}}}"), v);
        }
        if !stages.contains(&image) {
            let tag = image_tag(&image);
            assert!(
                tag.is_some_and(|t| t != "latest"),
                "FROM {image} is not pinned"
            );
        }
        if let Some(alias) = words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
            stages.insert(words[alias + 1].to_owned());
        }
    }
    let runtime = dockerfile.rsplit("\nFROM ").next().expect("a final stage");
    let user = runtime
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("the final stage sets USER");
    assert!(
        !["0", "root"].contains(&user.split(':').next().unwrap_or("")),
        "USER {user}"
    );

    let version = env!("CARGO_PKG_VERSION");
    for overlay in OVERLAYS {
        let (_, docs) = rendered(overlay);
        for c in containers(&docs) {
            let image = c.container["image"].as_str().unwrap_or("");
            if !image.starts_with("switchboard:") {
                continue;
            }
            assert_eq!(image_tag(image), Some(version), "{overlay}: {image}");
            let command = c.container["command"][0].as_str().unwrap_or("");
            assert!(
                bins.contains(command),
                "{overlay} runs {command:?}, not in the image"
            );
        }
    }
    for s in compose_services(&compose()) {
        assert_eq!(
            s.def["image"].as_str(),
            Some(format!("switchboard:{version}").as_str()),
            "compose {}",
            s.name
        );
        let command = s.def["command"][0].as_str().unwrap_or("");
        assert!(
            bins.contains(command),
            "compose {} runs {command:?}",
            s.name
        );
    }
}

#[test]
fn compose_runs_two_instances_of_each_service_on_loopback_ports() {
    let compose = compose();
    let services = compose_services(&compose);
    for service in [Service::Auth, Service::Presence, Service::Messaging] {
        let n = services.iter().filter(|s| s.service == service).count();
        assert_eq!(n, 2, "{service:?} instances");
    }
    for s in &services {
        assert!(s.env.contains_key("REDIS_URL"), "{} shares Redis", s.name);
    }
    let problems = compose_problems(&compose);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let text = read("deploy/compose.yaml").expect("compose");
    assert_each_reported(
        &text,
        &[
            ("user: \"65532:65532\"", "user: \"0:0\"", "runs as root"),
            ("read_only: true", "read_only: false", "writable"),
            (
                "cap_drop: [\"ALL\"]",
                "cap_drop: [\"NET_RAW\"]",
                "capabilities",
            ),
            (
                "image: switchboard:0.1.0",
                "image: switchboard",
                "not pinned",
            ),
            (
                "stop_grace_period: 15s",
                "stop_grace_period: 10s",
                "must exceed",
            ),
        ],
        |docs| compose_problems(&docs[0]),
    );
    let all = compose["services"].as_hash().expect("services");
    assert!(all.contains_key(&Yaml::String("redis".into())));
    assert!(all.contains_key(&Yaml::String("jaeger".into())));
    let mut published = BTreeSet::new();
    for (name, def) in all {
        for port in def["ports"].as_vec().map(Vec::as_slice).unwrap_or(&[]) {
            let port = port.as_str().expect("ports as strings");
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond loopback"
            );
            assert!(
                published.insert(port.split(':').nth(1).map(str::to_owned)),
                "{port} twice"
            );
        }
    }
    for port in [
        "50051", "50061", "50052", "50062", "50053", "50063", "16686",
    ] {
        assert!(
            published.contains(&Some(port.to_owned())),
            "{port} is published"
        );
    }
}

/// The addresses a pod gets from the cluster, replaced by this test's own; everything else
/// the dev overlay sets is passed to the binaries as is.
const CLUSTER_ADDRESSES: &[&str] = &[
    "LISTEN_ADDR",
    "METRICS_ADDR",
    "REDIS_URL",
    "AUTH_URL",
    "PRESENCE_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "AUTH_SIGNING_KEY_FILE",
];

/// The manifests' own settings start every service, and each answers its probes' health
/// names `SERVING`, then `NOT_SERVING` for readiness as soon as it is told to stop, while
/// liveness stays `SERVING` until the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_start_with_the_manifest_settings_and_answer_their_probes() {
    use switchboard_tests::instance::{ChildService, SERVICE_TOKEN};
    use switchboard_tests::redis::RedisServer;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let (_, docs) = rendered("dev");
    let redis = RedisServer::spawn().expect("redis");
    let key = switchboard_tests::instance::command("switchboard-auth")
        .expect("auth binary")
        .arg("--generate-signing-key")
        .output()
        .expect("generate a key");
    assert!(key.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("signing-key.pem");
    std::fs::write(&key_file, &key.stdout).expect("write key");

    let all = containers(&docs);
    let mut started: Vec<(Service, ChildService, Vec<String>)> = Vec::new();
    for service in [Service::Auth, Service::Presence, Service::Messaging] {
        let c = all
            .iter()
            .find(|c| c.service() == Some(service))
            .expect("a container per service");
        let manifest_env = environment(&docs, c).expect("environment");
        let mut env: Vec<(&str, String)> = manifest_env
            .iter()
            .filter(|(k, _)| !CLUSTER_ADDRESSES.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str(), v.clone()?)))
            .collect();
        // Secrets (secretKeyRef: no value in the manifests).
        for (name, value) in [
            ("SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
            ("AUTH_ADMIN_USERNAME", "probe_admin".to_owned()),
            ("AUTH_ADMIN_PASSWORD", "probe admin password".to_owned()),
        ] {
            if manifest_env.contains_key(name) {
                env.push((name, value));
            }
        }
        env.push(("REDIS_URL", redis.url()));
        // Short enough for the test; the manifests' own grace is checked by the rules.
        env.retain(|(k, _)| *k != "SHUTDOWN_GRACE_SECS");
        env.push(("SHUTDOWN_GRACE_SECS", "2".to_owned()));
        if let Some((_, auth, _)) = started.first() {
            env.push(("AUTH_URL", format!("http://{}", auth.addr)));
        }
        if let Some((_, presence, _)) = started.get(1) {
            env.push(("PRESENCE_URL", format!("http://{}", presence.addr)));
        }
        if service == Service::Auth {
            env.push(("AUTH_SIGNING_KEY_FILE", key_file.display().to_string()));
        }
        let bin = c.container["command"][0].as_str().expect("command");
        let child = ChildService::spawn(bin, &env).unwrap_or_else(|e| panic!("{bin}: {e:#}"));
        let probes: Vec<String> = ["startupProbe", "livenessProbe", "readinessProbe"]
            .iter()
            .filter_map(|p| {
                c.container[*p]["grpc"]["service"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert!(probes.len() >= 2, "{service:?} probes: {probes:?}");
        started.push((service, child, probes));
    }
    for (service, child, probes) in &mut started {
        let mut health = HealthClient::new(child.channel());
        for name in probes.iter() {
            let status = health
                .check(HealthCheckRequest {
                    service: name.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{service:?} health {name:?}: {e}"))
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "{service:?} {name:?}"
            );
        }
        let mut watch = health
            .watch(HealthCheckRequest {
                service: "readiness".to_owned(),
            })
            .await
            .expect("watch readiness")
            .into_inner();
        let first = watch.message().await.expect("status").expect("a status");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        // Liveness is not readiness: a draining process is alive until it exits.
        let mut alive = health
            .watch(HealthCheckRequest {
                service: "liveness".to_owned(),
            })
            .await
            .expect("watch liveness")
            .into_inner();
        let first = alive.message().await.expect("status").expect("a status");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        child.signal_term().expect("SIGTERM");
        let mut not_ready = false;
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(5), watch.message()).await
        {
            if m.status == ServingStatus::NotServing as i32 {
                not_ready = true;
                break;
            }
        }
        assert!(not_ready, "{service:?} stayed ready after SIGTERM");
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(5), alive.message()).await
        {
            assert_eq!(
                m.status,
                ServingStatus::Serving as i32,
                "{service:?} said it was not alive while draining"
            );
        }
        let exit = child.wait_exit(Duration::from_secs(10)).expect("exit");
        assert!(
            exit.success(),
            "{service:?} exit {exit:?}:\n{}",
            child.output()
        );
    }
}
