"""Deployment without options: asgd.config.env's resolution (option > ASGD_* > SLURM_* >
default), a real worker placed by environment variables only, the Kubernetes manifests
(deploy/k8s/, checked against small schemas and against the CLI and the config), and the
Slurm script (deploy/slurm/asgd.sbatch, run by bash with srun and scontrol replaced by
stubs that record what they were asked to start). No cluster is involved."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from asgd.cli import cli
from asgd.config import load_config
from asgd.config import env as envlib
from asgd.config.env import EnvError, Setting

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SBATCH = REPO / "deploy" / "slurm" / "asgd.sbatch"


# ----------------------------------------------------------------------------------------------
# asgd.config.env: pure resolution

@pytest.mark.parametrize("option, env, host, expected", [
    (3, {"ASGD_RANK": "1", "SLURM_PROCID": "2"}, None, Setting(3, "--rank")),
    (None, {"ASGD_RANK": "1", "SLURM_PROCID": "2", "ASGD_RANK_FROM_HOSTNAME": "1"},
     "asgd-worker-4", Setting(1, "ASGD_RANK")),
    (None, {"ASGD_RANK_FROM_HOSTNAME": "1", "SLURM_PROCID": "2"}, "asgd-worker-4",
     Setting(4, "host name asgd-worker-4")),
    (None, {"ASGD_RANK_FROM_HOSTNAME": "0", "SLURM_PROCID": "2"}, "asgd-worker-4",
     Setting(2, "SLURM_PROCID")),
    (None, {"ASGD_RANK": " ", "SLURM_PROCID": "0"}, None, Setting(0, "SLURM_PROCID")),
    (None, {}, None, Setting(0, "default")),
])
def test_rank_takes_the_option_then_asgd_then_slurm_then_zero(option, env, host, expected):
    assert envlib.rank(option, env, host) == expected


def test_rank_from_the_hostname_reads_hostname_when_not_given():
    env = {"ASGD_RANK_FROM_HOSTNAME": "true", "HOSTNAME": "asgd-worker-7"}
    assert envlib.rank(None, env).value == 7


@pytest.mark.parametrize("host, ordinal", [
    ("asgd-worker-0", 0), ("asgd-worker-3", 3), ("asgd-worker-12", 12),
    ("asgd-worker-2.asgd-worker.default.svc.cluster.local", 2), ("w-1-5", 5)])
def test_a_statefulset_pod_name_gives_its_ordinal(host, ordinal):
    assert envlib.hostname_ordinal(host) == ordinal


@pytest.mark.parametrize("host", ["asgd-worker", "worker3", "", "node.asgd-worker-2"])
def test_a_hostname_without_an_ordinal_is_an_error_naming_it(host):
    with pytest.raises(EnvError, match="ASGD_RANK_FROM_HOSTNAME.*does not end in"):
        envlib.hostname_ordinal(host)


@pytest.mark.parametrize("env, message", [
    ({"ASGD_RANK": "one"}, r"ASGD_RANK='one' is not an integer"),
    ({"ASGD_RANK": "-1"}, r"ASGD_RANK=-1 must be >= 0"),
    ({"SLURM_PROCID": "1.5"}, r"SLURM_PROCID='1.5' is not an integer"),
    ({"ASGD_RANK_FROM_HOSTNAME": "maybe"}, r"ASGD_RANK_FROM_HOSTNAME='maybe': expected 1 or 0"),
])
def test_a_bad_rank_variable_is_an_error_naming_it(env, message):
    with pytest.raises(EnvError, match=message):
        envlib.rank(None, env, "h-1")


def test_a_negative_rank_option_is_an_error():
    with pytest.raises(EnvError, match="--rank -1"):
        envlib.rank(-1, {})


def test_world_size_asgd_workers_then_slurm_ntasks_only_beside_slurm_procid():
    env = {"ASGD_WORKERS": "4", "SLURM_NTASKS": "8"}
    assert envlib.workers((), env, "ASGD_RANK") == Setting(4, "ASGD_WORKERS")
    assert envlib.workers((), env, None) == Setting(4, "ASGD_WORKERS")      # a server
    slurm = {"SLURM_NTASKS": "8"}
    assert envlib.workers((), slurm, "SLURM_PROCID") == Setting(8, "SLURM_NTASKS")
    # a rank given some other way (asgd launch's --rank inside a Slurm job): the config's
    assert envlib.workers((), slurm, "--rank") is None
    assert envlib.workers((), slurm, None) is None
    assert envlib.workers((), {}, "SLURM_PROCID") is None


def test_an_explicit_set_run_workers_beats_the_environment():
    env = {"ASGD_WORKERS": "4", "SLURM_NTASKS": "8"}
    assert envlib.workers(["run.workers=3"], env, "SLURM_PROCID") is None
    overrides = envlib.with_workers(["optimizer.lr=0.1"], Setting(4, "ASGD_WORKERS"))
    assert overrides == ["run.workers=4", "optimizer.lr=0.1"]
    # prepended, so a later --set wins when load_config applies them in order
    cfg = load_config(REPO / "configs" / "default.yaml",
                      envlib.with_workers(["run.workers=3"], Setting(4, "ASGD_WORKERS")))
    assert cfg.run.workers == 3


@pytest.mark.parametrize("value, message", [("0", ">= 1"), ("two", "not an integer")])
def test_a_bad_world_size_is_an_error_naming_it(value, message):
    with pytest.raises(EnvError, match=f"ASGD_WORKERS.*{message}"):
        envlib.workers((), {"ASGD_WORKERS": value}, None)


def test_a_rank_outside_the_world_names_both_sources():
    assert envlib.check_rank(Setting(1, "ASGD_RANK"), 2) == 1
    with pytest.raises(EnvError, match=r"rank SLURM_PROCID=4 is not in \[0, run.workers=4\) "
                                       r"\(run.workers from SLURM_NTASKS=4\)"):
        envlib.check_rank(Setting(4, "SLURM_PROCID"), 4, Setting(4, "SLURM_NTASKS"))
    with pytest.raises(EnvError, match=r"rank 3 \(host name w-3\) .*from the configuration"):
        envlib.check_rank(Setting(3, "host name w-3"), 2)


def test_server_endpoints_bind_and_shard():
    env = {"ASGD_SERVER": "tcp://a:1,tcp://b:2", "ASGD_BIND": "tcp://0.0.0.0:5555",
           "ASGD_SHARD": "1"}
    assert envlib.server_endpoints(None, env) == Setting("tcp://a:1,tcp://b:2", "ASGD_SERVER")
    assert envlib.server_endpoints("tcp://c:3", env) == Setting("tcp://c:3", "--server")
    assert envlib.server_endpoints(None, {"ASGD_SERVER": ""}) is None
    assert envlib.bind(None, env) == Setting("tcp://0.0.0.0:5555", "ASGD_BIND")
    assert envlib.bind("tcp://127.0.0.1:0", env).source == "--bind"
    assert envlib.bind(None, {}) is None
    assert envlib.shard(None, env, 2) == 1
    assert envlib.shard(0, env, 2) == 0
    assert envlib.shard(None, {}, 1) == 0
    with pytest.raises(EnvError, match=r"shard ASGD_SHARD=1 is not in \[0, server.shards=1\)"):
        envlib.shard(None, env, 1)


# ----------------------------------------------------------------------------------------------
# the commands: errors from the environment, before anything starts

NO_PLACE = {k: None for k in ("ASGD_SERVER", "ASGD_BIND", "ASGD_SHARD", "ASGD_RANK",
                              "ASGD_RANK_FROM_HOSTNAME", "ASGD_WORKERS", "SLURM_PROCID",
                              "SLURM_NTASKS")}
CONFIG = str(REPO / "configs" / "default.yaml")


@pytest.mark.parametrize("env, message", [
    ({}, "give the server's address"),
    ({"ASGD_SERVER": "nohost"}, "ASGD_SERVER: 'nohost' has no port"),
    ({"ASGD_SERVER": "s:5555", "ASGD_RANK": "2"},
     r"rank ASGD_RANK=2 is not in [0, run.workers=2)"),
    ({"ASGD_SERVER": "s:5555", "SLURM_PROCID": "3", "SLURM_NTASKS": "3"},
     r"(run.workers from SLURM_NTASKS=3)"),
    ({"ASGD_SERVER": "s:5555", "ASGD_RANK_FROM_HOSTNAME": "1", "HOSTNAME": "login"},
     "'login' does not end in -<ordinal>"),
])
def test_asgd_worker_refuses_a_bad_environment_with_exit_2(env, message):
    res = CliRunner().invoke(cli, ["worker", "--config", CONFIG], env={**NO_PLACE, **env})
    assert res.exit_code == 2, res.output
    assert message in res.output


@pytest.mark.parametrize("env, message", [
    ({"ASGD_SHARD": "1"}, "shard ASGD_SHARD=1 is not in [0, server.shards=1)"),
    ({"ASGD_BIND": "tcp://0.0.0.0"}, "ASGD_BIND: 'tcp://0.0.0.0' needs a host and a port"),
    ({"ASGD_WORKERS": "none"}, "ASGD_WORKERS='none' is not an integer"),
])
def test_asgd_server_refuses_a_bad_environment_with_exit_2(env, message):
    res = CliRunner().invoke(cli, ["server", "--config", CONFIG], env={**NO_PLACE, **env})
    assert res.exit_code == 2, res.output
    assert message in res.output


# ----------------------------------------------------------------------------------------------
# a real worker placed by its environment only

@pytest.mark.slow
def test_workers_placed_only_by_environment_variables_train_against_a_real_server(
        start_server, make_config, processes, clients, tmp_path):
    cfg = make_config(worker={"max_steps": 20})
    server = start_server(cfg)
    base = {k: v for k, v in processes.env.items() if k not in NO_PLACE}
    placements = {   # rank 0 as Slurm places it, rank 1 as a Kubernetes StatefulSet does
        "slurm": {"ASGD_SERVER": server.endpoint, "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
        "k8s": {"ASGD_SERVER": server.endpoint, "ASGD_RANK_FROM_HOSTNAME": "1",
                "HOSTNAME": "asgd-worker-1", "ASGD_WORKERS": "2"},
    }
    popens = {}
    for name, extra in placements.items():
        processes.env = {**base, **extra}
        popens[name] = processes.spawn(["-m", "worker", "--config", str(cfg)],
                                       tmp_path / f"worker-{name}.log")
    for name, popen in popens.items():
        log = tmp_path / f"worker-{name}.log"
        assert popen.wait(timeout=120) == 0, log.read_text()
    workers = clients(server.endpoint).stats()["workers"]
    assert {w: (s["rank"], s["pushes"]) for w, s in workers.items()} == \
        {"w0": (0, 20), "w1": (1, 20)}
    assert "rank 1 done" in (tmp_path / "worker-k8s.log").read_text()


# ----------------------------------------------------------------------------------------------
# Kubernetes: small schemas of the fields the manifests use

STR, INT, ANY = str, int, object
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")   # DNS-1123 label

METADATA = {"name": STR, "labels?": {"*": STR}}
ENV = [{"name": STR, "value?": STR}]
CONTAINER = {
    "name": STR, "image": STR, "imagePullPolicy?": STR, "command": [STR], "args?": [STR],
    "env?": ENV, "ports?": [{"name?": STR, "containerPort": INT, "protocol?": STR}],
    "readinessProbe?": {"tcpSocket": {"port": ANY}, "initialDelaySeconds?": INT,
                        "periodSeconds?": INT},
    "resources": {"requests": {"cpu": STR, "memory": STR},
                  "limits": {"cpu": STR, "memory": STR}},
    "volumeMounts?": [{"name": STR, "mountPath": STR, "readOnly?": bool}],
}
VOLUME = {"name": STR, "configMap?": {"name": STR},
          "persistentVolumeClaim?": {"claimName": STR}}
POD_TEMPLATE = {"metadata": {"labels": {"*": STR}},
                "spec": {"terminationGracePeriodSeconds?": INT, "containers": [CONTAINER],
                         "volumes?": [VOLUME]}}
SELECTOR = {"matchLabels": {"*": STR}}
SCHEMAS = {
    ("v1", "ConfigMap"): {"data": {"*": STR}},
    ("v1", "PersistentVolumeClaim"): {"spec": {"accessModes": [STR],
                                               "resources": {"requests": {"storage": STR}}}},
    ("v1", "Service"): {"spec": {"type?": STR, "clusterIP?": STR, "selector": {"*": STR},
                                 "ports?": [{"name?": STR, "port": INT, "targetPort": ANY,
                                             "protocol?": STR}]}},
    ("apps/v1", "Deployment"): {"spec": {"replicas": INT, "strategy?": {"type": STR},
                                         "selector": SELECTOR, "template": POD_TEMPLATE}},
    ("apps/v1", "StatefulSet"): {"spec": {"serviceName": STR, "replicas": INT,
                                          "podManagementPolicy?": STR, "selector": SELECTOR,
                                          "template": POD_TEMPLATE}},
}


def check(value, schema, path: str = "") -> list[str]:
    """What in ``value`` breaks ``schema``: a type; a dict of required keys (``key?``:
    optional, ``*``: any key with that schema; other keys are errors: a typo is caught); or a
    one-item list, a non-empty list of such items."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path or '.'}: expected a mapping, got {type(value).__name__}"]
        errors = []
        known = {k.rstrip("?") for k in schema}
        for key, sub in schema.items():
            if key == "*":
                for k, v in value.items():
                    errors += check(v, sub, f"{path}.{k}")
            elif key.rstrip("?") in value:
                errors += check(value[key.rstrip("?")], sub, f"{path}.{key.rstrip('?')}")
            elif not key.endswith("?"):
                errors.append(f"{path}.{key}: missing")
        if "*" not in schema:
            errors += [f"{path}.{k}: unknown field" for k in value if k not in known]
        return errors
    if isinstance(schema, list):
        if not isinstance(value, list) or not value:
            return [f"{path}: expected a non-empty list"]
        return [e for i, v in enumerate(value) for e in check(v, schema[0], f"{path}[{i}]")]
    if schema is ANY:
        return []
    if schema is int and isinstance(value, bool) or not isinstance(value, schema):
        return [f"{path}: expected {schema.__name__}, got {value!r}"]
    return []


def test_the_schema_check_catches_what_it_should():
    good = {"spec": {"replicas": 2, "serviceName": "s", "selector": {"matchLabels": {"a": "b"}},
                     "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
                         {"name": "c", "image": "i", "command": ["x"], "resources": {
                             "requests": {"cpu": "1", "memory": "1Gi"},
                             "limits": {"cpu": "1", "memory": "1Gi"}}}]}}}}
    schema = SCHEMAS["apps/v1", "StatefulSet"]
    assert check(good, schema) == []
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["spec"]["replicas"] = "2"
    bad["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    del bad["spec"]["serviceName"]
    assert sorted(check(bad, schema)) == [
        ".spec.replicas: expected int, got '2'", ".spec.serviceName: missing",
        ".spec.template.spec.containers[0].comand: unknown field"]


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind]


def the(kind: str) -> dict:
    (doc,) = by_kind(kind)
    return doc


def test_every_manifest_parses_has_its_identity_and_passes_its_kinds_schema():
    docs = manifests()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment",
                                               "PersistentVolumeClaim", "Service", "Service",
                                               "StatefulSet"]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert NAME.match(d["metadata"]["name"]), d["metadata"]
        schema = {"apiVersion": STR, "kind": STR, "metadata": METADATA,
                  **SCHEMAS[d["apiVersion"], d["kind"]]}
        assert check(d, schema) == [], (d["kind"], d["metadata"]["name"])
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(names)) == len(names)


def test_selectors_volumes_and_references_are_consistent():
    names = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    services = {d["metadata"]["name"]: d for d in by_kind("Service")}
    for d in by_kind("Deployment") + by_kind("StatefulSet"):
        spec = d["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] == "asgd:latest"
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            assert env.get("OMP_NUM_THREADS") == "1"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) \
                    in names
        if d["kind"] == "StatefulSet":
            governing = services[spec["serviceName"]]
            assert governing["spec"].get("clusterIP") == "None"
    for s in services.values():    # every Service selects the pods of a workload
        sel = s["spec"]["selector"].items()
        assert any(sel <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in by_kind("Deployment") + by_kind("StatefulSet"))


def container_argvs(container: dict) -> list[list[str]]:
    """The asgd command lines a container runs: its command and args, or each ``exec asgd``
    line of an ``sh -c`` script, once as it is and once with the positional arguments the
    script may set (``"$@"``)."""
    argv = container["command"] + container.get("args", [])
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    script = argv[2]
    out = []
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("exec asgd"):
            words = shlex.split(line)[1:]
            plain = [w for w in words if w != "$@"]
            out.append(plain)
            out += [plain + shlex.split(m) for m in re.findall(r"set -- ([^;]+);", script)]
    assert out, script
    return out


def parsed(argv: list[str]) -> tuple[str, dict]:
    assert argv[0] == "asgd", argv
    ctx = cli.get_command(None, argv[1]).make_context(argv[1], argv[2:])
    return argv[1], ctx.params


def configmap_config(tmp_path: Path, mount: str, path: str):
    """The config a container reads at ``path``, from the ConfigMap mounted at ``mount``."""
    cm = the("ConfigMap")
    key = os.path.relpath(path, mount)
    file = tmp_path / key
    file.write_text(cm["data"][key])
    return load_config(file)


def mounts(pod: dict, container: dict) -> dict[str, dict]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def test_the_configmap_holds_the_default_config(tmp_path):
    file = tmp_path / "config.yaml"
    file.write_text(the("ConfigMap")["data"]["config.yaml"])
    assert load_config(file).to_dict() == \
        load_config(REPO / "configs" / "default.yaml").to_dict()


def test_the_server_pod_runs_asgd_server_on_the_services_port_and_checkpoints_to_its_volume(
        tmp_path):
    deploy = the("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    where = mounts(pod, container)
    argvs = container_argvs(container)
    assert len(argvs) == 2 and "--resume" in argvs[1]      # started again: it resumes
    for argv in argvs:
        kind, params = parsed(argv)
        assert kind == "server"
        mount = os.path.dirname(params["config_path"])
        assert where[mount]["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
        cfg = configmap_config(tmp_path, mount, params["config_path"])
        bind = envlib.bind(params["bind"], env)
        assert bind.source == "ASGD_BIND" and bind.value.startswith("tcp://0.0.0.0:")
        port = int(bind.value.rsplit(":", 1)[1])
        assert envlib.shard(params["shard"], env, cfg.server.shards) == 0
        # the run directory, so the checkpoint, is on the claim
        run_mount = [m for m in where if params["run_dir"].startswith(m + "/")]
        assert run_mount and "persistentVolumeClaim" in where[run_mount[0]]
    assert f"{params['run_dir']}/checkpoint/state.asgd" in container["args"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    server_svc = [s for s in by_kind("Service") if s["spec"].get("clusterIP") != "None"]
    (svc,) = server_svc
    (sp,) = svc["spec"]["ports"]
    assert sp["port"] == port == ports[sp["targetPort"]] == 5555
    assert container["readinessProbe"]["tcpSocket"]["port"] in (sp["targetPort"], port)


def test_the_worker_statefulset_gives_ranks_0_to_run_workers_and_reaches_the_service(
        tmp_path):
    sts = the("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ASGD_RANK_FROM_HOSTNAME"] == "1"
    (argv,) = container_argvs(container)
    kind, params = parsed(argv)
    assert kind == "worker"
    mount = os.path.dirname(params["config_path"])
    cfg = configmap_config(tmp_path, mount, params["config_path"])
    replicas = sts["spec"]["replicas"]
    assert replicas == cfg.run.workers
    ranks = []
    for ordinal in range(replicas):   # a StatefulSet's pods are <name>-0, <name>-1, ...
        placed = envlib.rank(params["rank"], env, f"{sts['metadata']['name']}-{ordinal}")
        world = envlib.workers(params["overrides"], env, placed.source)
        n = world.value if world else cfg.run.workers
        ranks.append(envlib.check_rank(placed, n, world))
    assert ranks == list(range(cfg.run.workers))
    endpoint = envlib.server_endpoints(params["endpoint"], env)
    assert endpoint.source == "ASGD_SERVER"
    host, port = endpoint.value.removeprefix("tcp://").split(":")
    svc = [s for s in by_kind("Service") if s["metadata"]["name"] == host]
    assert svc and int(port) == svc[0]["spec"]["ports"][0]["port"]
    assert svc[0]["metadata"]["labels"]["app.kubernetes.io/component"] == "server"


# ----------------------------------------------------------------------------------------------
# Slurm: the sbatch script, run by bash with srun and scontrol as recording stubs

def test_the_sbatch_script_is_valid_bash_with_its_directives_first():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    lines = SBATCH.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
    first_code = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    assert directives and max(directives) < first_code   # sbatch reads no further
    text = "\n".join(lines[i] for i in directives)
    for option in ("--job-name", "--ntasks=", "--cpus-per-task", "--time", "--output"):
        assert option in text


SRUN = """#!{python}
import json, os, sys, time
log = os.environ["STUB_LOG"]
if "{worker}" in sys.argv:    # the workers run while the server does: wait for its record
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and not (os.path.exists(log) and "server" in open(log).read()):
        time.sleep(0.05)
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                        if k.startswith(("ASGD_", "OMP_"))}}}}) + "\\n")
"""
SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 1
echo node1; echo node2; echo node3
"""


def run_sbatch(tmp_path: Path, ntasks: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN.format(python=sys.executable, worker="worker")),
                       ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(stat.S_IRWXU)
    log = tmp_path / f"srun-{ntasks}.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in NO_PLACE and
           not k.startswith("SLURM_")}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", STUB_LOG=str(log),
               SLURM_JOB_ID="42", SLURM_NTASKS=str(ntasks), SLURM_JOB_NODELIST="node[1-3]",
               SLURM_CPUS_PER_TASK="2")
    res = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=60)
    calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return res, calls


def srun_split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """srun's own options (``--key=value``) and the command it runs."""
    i = argv.index("asgd")
    opts = dict(o.removeprefix("--").split("=", 1) if "=" in o else (o.removeprefix("--"), "")
                for o in argv[:i])
    return opts, argv[i:]


@pytest.mark.parametrize("ntasks", [3, 5])
def test_the_sbatch_script_starts_a_server_on_the_first_node_and_ranked_workers(
        tmp_path, ntasks):
    res, calls = run_sbatch(tmp_path, ntasks)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "runs" / "slurm-42").is_dir()
    assert len(calls) == 2
    # the server's srun runs in the background: the two may be recorded in either order
    calls.sort(key=lambda c: srun_split(c["argv"])[1][1] != "server")
    (server_opts, server_argv), (worker_opts, worker_argv) = map(srun_split,
                                                                  (c["argv"] for c in calls))
    server_env, worker_env = calls[0]["env"], calls[1]["env"]
    assert (server_opts["nodes"], server_opts["ntasks"], server_opts["nodelist"]) == \
        ("1", "1", "node1")
    n_workers = ntasks - 1
    assert worker_opts["ntasks"] == str(n_workers)
    assert server_env["OMP_NUM_THREADS"] == worker_env["OMP_NUM_THREADS"] == "2"

    # the server, as srun runs it: one task of its own step
    kind, params = parsed(server_argv)
    assert kind == "server" and params["run_dir"] == "runs/slurm-42"
    env = {**server_env, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    world = envlib.workers(params["overrides"], env, None)
    cfg = load_config(REPO / params["config_path"],
                      envlib.with_workers(params["overrides"], world))
    assert cfg.run.workers == n_workers
    bind = envlib.bind(params["bind"], env)
    assert bind.value == "tcp://0.0.0.0:5555"

    # every worker task: SLURM_PROCID of SLURM_NTASKS, the server's address from ASGD_SERVER
    ranks = []
    for procid in range(n_workers):
        kind, params = parsed(worker_argv)
        assert kind == "worker"
        env = {**worker_env, "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(n_workers)}
        placed = envlib.rank(params["rank"], env)
        world = envlib.workers(params["overrides"], env, placed.source)
        assert world == Setting(n_workers, "SLURM_NTASKS")
        cfg = load_config(REPO / params["config_path"],
                          envlib.with_workers(params["overrides"], world))
        ranks.append(envlib.check_rank(placed, cfg.run.workers, world))
        endpoint = envlib.server_endpoints(params["endpoint"], env)
        assert endpoint == Setting("tcp://node1:5555", "ASGD_SERVER")
        assert endpoint.value.rsplit(":", 1)[1] == bind.value.rsplit(":", 1)[1]
    assert ranks == list(range(n_workers))


def test_the_sbatch_script_refuses_a_job_of_one_task(tmp_path):
    res, calls = run_sbatch(tmp_path, 1)
    assert res.returncode == 2 and "at least 2" in res.stderr
    assert calls == []


def test_asgd_launch_keeps_cluster_variables_from_its_children(processes, make_config,
                                                               tmp_path, mnist1d_cached):
    """A shell (or a Slurm job) with ASGD_WORKERS, ASGD_RANK or SLURM_PROCID set: asgd launch
    gives each of its processes its place itself, and the run is the configured one."""
    cfg = make_config(run={"max_updates": 100, "eval_every_s": 0, "name": "inherited",
                           "out_dir": str(tmp_path / "runs")})
    processes.env = dict(processes.env, ASGD_WORKERS="1", ASGD_RANK="5", SLURM_PROCID="3",
                         SLURM_NTASKS="9", ASGD_SERVER="tcp://127.0.0.1:9")
    r = processes.run(["-m", "asgd.cli", "launch", "--config", str(cfg), "--quiet"],
                      timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "runs" / "inherited" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["workers"] == 2
    assert summary["deaths"] == []
