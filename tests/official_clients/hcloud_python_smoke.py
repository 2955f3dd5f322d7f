#!/usr/bin/env python3
"""Drive the built-in Hetzner Cloud API simulator with Hetzner's official Python client.

Usage:
    hcloud_python_smoke.py [ENDPOINT [TOKEN]]
    (or HCLOUD_ENDPOINT / HCLOUD_TOKEN in the environment)

ENDPOINT is the API base, e.g. http://127.0.0.1:4000/v1. Needs `pip install 'hcloud>=2.23,<3'`.

The client is used unchanged and the official way (bound models, wait_until_finished,
get_all/get_by_name, APIException codes), covering what vps-controller itself calls: catalog
lists, SSH keys, firewalls, servers, power actions, pagination and the error codes the controller
branches on. Every check is printed; the exit status is 1 when any check fails, 2 on bad usage.

The simulator should be fresh (no objects of its own), with short actions (e.g. 0.1 s): each
run uses unique names, so running it twice against one simulator also works.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import time
import traceback
import uuid
from typing import Any, Callable

try:
    import hcloud
    from hcloud import APIException, Client
    from hcloud.firewalls import FirewallResource, FirewallResourceLabelSelector, FirewallRule
    from hcloud.images import Image
    from hcloud.locations import Location
    from hcloud.server_types import ServerType
    from hcloud.servers import ServerCreatePublicNetwork
    from hcloud.ssh_keys import SSHKey
except ImportError as import_error:  # pragma: no cover - depends on the machine
    print(
        f"hcloud_python_smoke: the official client is not installed ({import_error}); "
        "run: python3 -m pip install 'hcloud>=2.23,<3'",
        file=sys.stderr,
    )
    sys.exit(3)

# Enough SSH keys to need two pages: both official clients fetch "all" with per_page=50.
BULK_KEYS = 55
POLL_INTERVAL = 0.05
# Polls before wait_until_finished gives up (POLL_INTERVAL * this is the longest wait).
POLL_MAX_RETRIES = 400


class Report:
    """Collects check outcomes; a failed check never stops the run, an exception ends a section."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []
        self.section = ""

    def check(self, what: str, ok: bool, detail: Any = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            message = f"[{self.section}] {what}" + (f": {detail}" if detail != "" else "")
            self.failures.append(message)
            print(f"  FAIL  {what}" + (f": {detail}" if detail != "" else ""))
        return ok

    def equal(self, what: str, got: Any, want: Any) -> bool:
        return self.check(what, got == want, f"got {got!r}, want {want!r}")

    def api_error(self, what: str, call: Callable[[], Any], code: str) -> APIException | None:
        """Runs `call`, expecting APIException with `code` (e.g. not_found)."""
        try:
            result = call()
        except APIException as e:
            self.check(
                f"{what} -> APIException {code}",
                e.code == code,
                f"got code {e.code!r} ({e.message!r}, details {e.details!r})",
            )
            return e
        self.check(f"{what} -> APIException {code}", False, f"no error; returned {result!r}")
        return None

    def run(self, name: str, section: Callable[[], None]) -> None:
        self.section = name
        print(f"\n== {name}")
        try:
            section()
        except Exception as e:  # noqa: BLE001 - any exception is a finding to report
            self.failures.append(f"[{name}] unexpected {type(e).__name__}: {e}")
            print(f"  FAIL  unexpected {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)


def fake_ed25519_key(comment: str) -> tuple[str, str]:
    """An OpenSSH ed25519 public key line and its legacy MD5 fingerprint (as the API shows it)."""

    def string(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    blob = string(b"ssh-ed25519") + string(os.urandom(32))
    digest = hashlib.md5(blob).hexdigest()
    fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}", fingerprint


def wait_all(report: Report, what: str, actions: list[Any]) -> None:
    """wait_until_finished on every action; each must end in success."""
    for action in actions:
        action.wait_until_finished()
        report.check(
            f"{what}: action {action.command} #{action.id} finished successfully",
            action.status == "success" and action.finished is not None and action.progress == 100,
            f"status {action.status!r}, finished {action.finished!r}, progress {action.progress!r}",
        )


def main() -> int:
    args = sys.argv[1:]
    if len(args) > 2 or any(a in ("-h", "--help") for a in args):
        print(__doc__, file=sys.stderr)
        return 2
    endpoint = args[0] if args else os.environ.get("HCLOUD_ENDPOINT", "")
    token = args[1] if len(args) > 1 else os.environ.get("HCLOUD_TOKEN", "")
    if not endpoint or not token:
        print("need ENDPOINT and TOKEN (arguments or HCLOUD_ENDPOINT/HCLOUD_TOKEN)", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return 2
    endpoint = endpoint.rstrip("/")

    print(f"hcloud-python {hcloud.__version__} against {endpoint}")
    client = Client(
        token=token,
        api_endpoint=endpoint,
        application_name="vps-controller-compat",
        poll_interval=POLL_INTERVAL,
        poll_max_retries=POLL_MAX_RETRIES,
        timeout=30,
    )
    report = Report()
    run_id = uuid.uuid4().hex[:8]
    owner = {"managed-by": "compat-smoke", "run": run_id}
    selector = f"managed-by=compat-smoke,run={run_id}"
    state: dict[str, Any] = {}

    def authentication() -> None:
        wrong = Client(token=token + "-wrong", api_endpoint=endpoint, timeout=30)
        error = report.api_error("server_types.get_all with a wrong token", wrong.server_types.get_all, "unauthorized")
        if error is not None:
            report.check("its message is not empty", bool(error.message))

    def catalog() -> None:
        server_types = client.server_types.get_all()
        report.check("server_types.get_all returns types", len(server_types) > 0, server_types)
        images = client.images.get_all(type=["system"])
        report.check("images.get_all(type=system) returns images", len(images) > 0, images)
        locations = client.locations.get_all()
        report.check("locations.get_all returns locations", len(locations) > 0, locations)
        if not (server_types and images and locations):
            return
        server_type = next((t for t in server_types if t.architecture == "x86"), server_types[0])
        image = next(
            (i for i in images if i.architecture == server_type.architecture and i.name), images[0]
        )
        location = locations[0]
        report.check(
            "server type carries cores/memory/disk/prices",
            server_type.cores > 0 and server_type.memory > 0 and server_type.disk > 0 and server_type.prices,
            server_type.data_model,
        )
        by_name = client.server_types.get_by_name(server_type.name)
        report.equal("server_types.get_by_name finds it", by_name and by_name.id, server_type.id)
        by_name = client.images.get_by_name_and_architecture(image.name, image.architecture)
        report.equal("images.get_by_name_and_architecture finds it", by_name and by_name.id, image.id)
        by_name = client.locations.get_by_name(location.name)
        report.equal("locations.get_by_name finds it", by_name and by_name.id, location.id)
        state.update(server_type=server_type, image=image, location=location)

    def ssh_keys() -> None:
        public_key, fingerprint = fake_ed25519_key(f"compat-{run_id}")
        key = client.ssh_keys.create(
            name=f"compat-{run_id}-key", public_key=public_key, labels={**owner, "role": "main"}
        )
        report.equal("create: fingerprint is the MD5 of the key blob", key.fingerprint, fingerprint)
        report.equal("create: public_key round-trips", key.public_key, public_key)
        report.equal("create: labels round-trip", key.labels, {**owner, "role": "main"})
        report.check("create: created is a datetime", key.created is not None, key.created)

        found = client.ssh_keys.get_by_name(key.name)
        report.equal("get_by_name", found and found.id, key.id)
        found = client.ssh_keys.get_by_fingerprint(fingerprint)
        report.equal("get_by_fingerprint", found and found.id, key.id)
        report.equal("get_by_name of a missing name is None", client.ssh_keys.get_by_name(f"nope-{run_id}"), None)

        updated = key.update(labels={**owner, "role": "updated"})
        report.equal("update replaces the labels", updated.labels, {**owner, "role": "updated"})
        report.equal("update keeps the name", updated.name, key.name)
        renamed = client.ssh_keys.update(key, name=f"compat-{run_id}-renamed")
        report.equal("update name (labels omitted)", (renamed.name, renamed.labels), (f"compat-{run_id}-renamed", {**owner, "role": "updated"}))
        listed = client.ssh_keys.get_all(label_selector=f"{selector},role=updated")
        report.equal("get_all(label_selector) finds exactly the updated key", [k.id for k in listed], [key.id])
        listed = client.ssh_keys.get_all(label_selector=f"{selector},role in (main,other)")
        report.equal("get_all with an 'in' selector that does not match", listed, [])

        error = report.api_error(
            "create with a name in use",
            lambda: client.ssh_keys.create(name=renamed.name, public_key=fake_ed25519_key("x")[0]),
            "uniqueness_error",
        )
        if error is not None:
            report.equal("uniqueness_error details name the field", error.details, {"fields": [{"name": "name"}]})
        error = report.api_error(
            "create with a public key in use",
            lambda: client.ssh_keys.create(name=f"compat-{run_id}-dup", public_key=public_key),
            "uniqueness_error",
        )
        if error is not None:
            report.equal("uniqueness_error details name public_key", error.details, {"fields": [{"name": "public_key"}]})
        error = report.api_error(
            "create with a malformed public key",
            lambda: client.ssh_keys.create(name=f"compat-{run_id}-bad", public_key="ssh-ed25519 not-base64!"),
            "invalid_input",
        )
        if error is not None:
            fields = [f.get("name") for f in (error.details or {}).get("fields", [])]
            report.check("invalid_input details name public_key", "public_key" in fields, error.details)
        report.api_error("get_by_id of a missing key", lambda: client.ssh_keys.get_by_id(987654321), "not_found")
        state["ssh_key"] = renamed

    def pagination() -> None:
        created = []
        for n in range(BULK_KEYS):
            public_key, _ = fake_ed25519_key(f"bulk-{n}")
            created.append(
                client.ssh_keys.create(
                    name=f"compat-{run_id}-bulk-{n:02}", public_key=public_key, labels={**owner, "bulk": "yes"}
                )
            )
        every = client.ssh_keys.get_all(label_selector=f"{selector},bulk=yes")
        report.equal(
            f"get_all follows next_page and returns all {BULK_KEYS} keys",
            sorted(k.id for k in every),
            sorted(k.id for k in created),
        )
        first = client.ssh_keys.get_list(label_selector=f"{selector},bulk", page=1, per_page=50)
        pagination = first.meta.pagination
        report.equal(
            "page 1 meta (page, per_page, previous, next, last, total)",
            (pagination.page, pagination.per_page, pagination.previous_page, pagination.next_page,
             pagination.last_page, pagination.total_entries),
            (1, 50, None, 2, 2, BULK_KEYS),
        )
        report.equal("page 1 holds 50 keys", len(first.ssh_keys), 50)
        second = client.ssh_keys.get_list(label_selector=f"{selector},bulk", page=2, per_page=50)
        report.equal(
            "page 2 meta",
            (second.meta.pagination.previous_page, second.meta.pagination.next_page, len(second.ssh_keys)),
            (1, None, BULK_KEYS - 50),
        )
        others = client.ssh_keys.get_all(label_selector=f"{selector},!bulk")
        report.equal("'!bulk' selector leaves the bulk keys out", [k.id for k in others], [state["ssh_key"].id] if "ssh_key" in state else [])
        for key in created:
            key.delete()
        report.equal("after deleting them get_all finds none", client.ssh_keys.get_all(label_selector=f"{selector},bulk=yes"), [])

    def firewalls() -> None:
        rules = [
            FirewallRule(direction="in", protocol="tcp", port="22", source_ips=["0.0.0.0/0", "::/0"], description="ssh"),
            FirewallRule(direction="in", protocol="icmp", source_ips=["0.0.0.0/0", "2001:0db8:0000::/32"]),
            FirewallRule(direction="out", protocol="tcp", port="1024-5000", destination_ips=["10.0.0.0/8"]),
        ]
        response = client.firewalls.create(name=f"compat-{run_id}-fw", rules=rules, labels=owner)
        firewall = response.firewall
        wait_all(report, "create", response.actions)
        report.equal("create: name", firewall.name, f"compat-{run_id}-fw")
        report.equal("create: labels", firewall.labels, owner)
        report.equal("create: three rules", len(firewall.rules), 3)
        if len(firewall.rules) == 3:
            ssh, icmp, out = firewall.rules
            report.equal("tcp rule round-trips", (ssh.direction, ssh.protocol, ssh.port, ssh.source_ips, ssh.destination_ips, ssh.description),
                         ("in", "tcp", "22", ["0.0.0.0/0", "::/0"], [], "ssh"))
            report.equal("icmp rule: no port, no description, IPv6 canonicalised",
                         (icmp.port, icmp.description, icmp.source_ips), (None, None, ["0.0.0.0/0", "2001:db8::/32"]))
            report.equal("out rule: destination_ips, no source_ips", (out.port, out.source_ips, out.destination_ips), ("1024-5000", [], ["10.0.0.0/8"]))
        report.equal("create: applied_to empty", firewall.applied_to, [])

        actions = firewall.set_rules([FirewallRule(direction="in", protocol="tcp", port="443", source_ips=["0.0.0.0/0"])])
        report.check("set_rules returns actions", len(actions) >= 1, actions)
        wait_all(report, "set_rules", actions)
        reloaded = client.firewalls.get_by_id(firewall.id)
        report.equal("set_rules replaced the rules", [(r.protocol, r.port) for r in reloaded.rules], [("tcp", "443")])

        updated = firewall.update(name=f"compat-{run_id}-fw2", labels={**owner, "tier": "web"})
        report.equal("update name and labels", (updated.name, updated.labels), (f"compat-{run_id}-fw2", {**owner, "tier": "web"}))
        found = client.firewalls.get_by_name(f"compat-{run_id}-fw2")
        report.equal("get_by_name", found and found.id, firewall.id)
        listed = client.firewalls.get_all(label_selector=f"{selector},tier=web")
        report.equal("get_all(label_selector)", [f.id for f in listed], [firewall.id])

        error = report.api_error(
            "create with a name in use",
            lambda: client.firewalls.create(name=f"compat-{run_id}-fw2"),
            "uniqueness_error",
        )
        error = report.api_error(
            "create with a port on an icmp rule",
            lambda: client.firewalls.create(
                name=f"compat-{run_id}-bad",
                rules=[FirewallRule(direction="in", protocol="icmp", port="80", source_ips=["0.0.0.0/0"])],
            ),
            "invalid_input",
        )
        report.api_error(
            "create with a malformed CIDR",
            lambda: client.firewalls.create(
                name=f"compat-{run_id}-bad",
                rules=[FirewallRule(direction="in", protocol="tcp", port="80", source_ips=["300.0.0.0/8"])],
            ),
            "invalid_input",
        )
        report.api_error("get_by_id of a missing firewall", lambda: client.firewalls.get_by_id(987654321), "not_found")
        state["firewall"] = client.firewalls.get_by_id(firewall.id)

    def servers() -> None:
        if not {"server_type", "image", "location", "ssh_key", "firewall"} <= state.keys():
            report.check("catalog, SSH key and firewall sections succeeded", False, sorted(state))
            return
        firewall = state["firewall"]
        user_data = "#cloud-config\nruncmd:\n  - echo compat\n"
        response = client.servers.create(
            name=f"compat-{run_id}-srv",
            # Referenced by name, as a caller that knows only names would.
            server_type=ServerType(name=state["server_type"].name),
            image=Image(name=state["image"].name),
            location=Location(name=state["location"].name),
            ssh_keys=[state["ssh_key"]],
            firewalls=[firewall],
            labels={**owner, "role": "web"},
            user_data=user_data,
        )
        server = response.server
        report.equal("create: root_password is None with SSH keys", response.root_password, None)
        if response.action.status == "running":
            report.equal("create: status initializing while create_server runs", server.status, "initializing")
        report.equal("create: labels", server.labels, {**owner, "role": "web"})
        report.equal("create: server_type", server.server_type.name, state["server_type"].name)
        report.equal("create: location", server.location.name, state["location"].name)
        report.equal("create: action command", response.action.command, "create_server")
        report.check("create: next_actions present (start + firewall)", len(response.next_actions) >= 1, response.next_actions)
        response.action.wait_until_finished()
        report.equal("create action succeeded", response.action.status, "success")
        wait_all(report, "create next_actions", response.next_actions)

        server = client.servers.get_by_id(server.id)
        report.equal("after the actions: running", server.status, "running")
        report.check("public IPv4 present", server.public_net.ipv4 is not None and bool(server.public_net.ipv4.ip), server.public_net.ipv4)
        report.check("public IPv6 network present", server.public_net.ipv6 is not None and server.public_net.ipv6.ip.endswith("/64"), server.public_net.ipv6)
        report.equal(
            "public_net.firewalls lists the firewall as applied",
            [(f.firewall.id, f.status) for f in server.public_net.firewalls],
            [(firewall.id, "applied")],
        )
        reloaded_fw = client.firewalls.get_by_id(firewall.id)
        report.equal("firewall.applied_to lists the server", [(r.type, r.server.id) for r in reloaded_fw.applied_to], [("server", server.id)])

        found = client.servers.get_by_name(server.name)
        report.equal("get_by_name", found and found.id, server.id)
        listed = client.servers.get_all(label_selector=f"{selector},role=web")
        report.equal("get_all(label_selector)", [s.id for s in listed], [server.id])
        listed = client.servers.get_all(label_selector=f"{selector},role!=web")
        report.equal("get_all with '!=' selector", listed, [])
        listed = client.servers.get_all(status=["running"], label_selector=selector)
        report.equal("get_all(status=running)", [s.id for s in listed], [server.id])

        error = report.api_error(
            "create with a name in use",
            lambda: client.servers.create(
                name=server.name, server_type=state["server_type"], image=state["image"], ssh_keys=[state["ssh_key"]]
            ),
            "uniqueness_error",
        )
        report.api_error(
            "create with a name that is not a hostname",
            lambda: client.servers.create(name="not_a_hostname!", server_type=state["server_type"], image=state["image"]),
            "invalid_input",
        )
        report.api_error(
            "create with an unknown server type",
            lambda: client.servers.create(name=f"compat-{run_id}-x", server_type=ServerType(name="no-such-type"), image=state["image"]),
            "invalid_input",
        )
        report.api_error("get_by_id of a missing server", lambda: client.servers.get_by_id(987654321), "not_found")

        # Firewall life cycle against a real attachment.
        error = report.api_error("delete a firewall still applied", firewall.delete, "resource_in_use")
        actions = firewall.remove_from_resources([FirewallResource(type="server", server=server)])
        wait_all(report, "remove_from_resources", actions)
        server = client.servers.get_by_id(server.id)
        report.equal("after removal: no firewall on the server", server.public_net.firewalls, [])
        report.api_error(
            "remove_from_resources again",
            lambda: firewall.remove_from_resources([FirewallResource(type="server", server=server)]),
            "firewall_resource_not_found",
        )
        actions = firewall.apply_to_resources([FirewallResource(type="server", server=server)])
        wait_all(report, "apply_to_resources", actions)
        server = client.servers.get_by_id(server.id)
        report.equal("after apply: the firewall is applied", [(f.firewall.id, f.status) for f in server.public_net.firewalls], [(firewall.id, "applied")])
        report.api_error(
            "apply_to_resources again",
            lambda: firewall.apply_to_resources([FirewallResource(type="server", server=server)]),
            "firewall_already_applied",
        )
        actions = firewall.remove_from_resources([FirewallResource(type="server", server=server)])
        wait_all(report, "remove_from_resources (before delete)", actions)

        # A label-selector application picks the server up by its labels.
        selector_fw = client.firewalls.create(
            name=f"compat-{run_id}-fw-sel",
            labels=owner,
            resources=[FirewallResource(type="label_selector", label_selector=FirewallResourceLabelSelector(selector=f"run={run_id},role=web"))],
        )
        wait_all(report, "create with a label_selector", selector_fw.actions)
        reloaded_fw = client.firewalls.get_by_id(selector_fw.firewall.id)
        applied = reloaded_fw.applied_to
        report.equal(
            "label_selector application lists the matching server",
            [(r.type, r.label_selector.selector, [x.server.id for x in (r.applied_to_resources or [])]) for r in applied],
            [("label_selector", f"run={run_id},role=web", [server.id])],
        )
        actions = reloaded_fw.remove_from_resources(
            [FirewallResource(type="label_selector", label_selector=FirewallResourceLabelSelector(selector=f"run={run_id},role=web"))]
        )
        wait_all(report, "remove the label_selector", actions)
        report.check("delete the selector firewall", reloaded_fw.delete() is True)

        # Power cycle.
        action = server.power_off()
        report.equal("power_off command", action.command, "stop_server")
        action.wait_until_finished()
        report.equal("power_off: action success", action.status, "success")
        report.equal("power_off: server off", client.servers.get_by_id(server.id).status, "off")
        action = server.power_on()
        report.equal("power_on command", action.command, "start_server")
        action.wait_until_finished()
        report.equal("power_on: server running", client.servers.get_by_id(server.id).status, "running")
        action = server.shutdown()
        report.equal("shutdown command", action.command, "shutdown_server")
        action.wait_until_finished()
        report.equal("shutdown: server off", client.servers.get_by_id(server.id).status, "off")

        history = server.get_actions(sort=["id:asc"])
        report.check(
            "get_actions lists create, start, stop, start, shutdown",
            [a.command for a in history if a.command.endswith("_server")][:5]
            == ["create_server", "start_server", "stop_server", "start_server", "shutdown_server"],
            [a.command for a in history],
        )
        got = client.actions.get_by_id(action.id)
        report.equal("actions.get_by_id", (got.id, got.command, got.status), (action.id, "shutdown_server", "success"))

        renamed = server.update(labels={**owner, "role": "db"})
        report.equal("update replaces the labels", renamed.labels, {**owner, "role": "db"})

        delete_action = server.delete()
        report.equal("delete returns the delete_server action", delete_action.command, "delete_server")
        delete_action.wait_until_finished()
        report.equal("delete action success", delete_action.status, "success")
        report.api_error("get_by_id after delete", lambda: client.servers.get_by_id(server.id), "not_found")
        report.equal("get_by_name after delete", client.servers.get_by_name(server.name), None)

        report.check("delete the firewall once detached", firewall.delete() is True)
        report.api_error("get_by_id of the deleted firewall", lambda: client.firewalls.get_by_id(firewall.id), "not_found")

    def server_variants() -> None:
        if not {"server_type", "image", "ssh_key"} <= state.keys():
            report.check("catalog and SSH key sections succeeded", False, sorted(state))
            return
        # Key by name, IPv4 only, not started: what a cost-saving or IPv4-only plan sends.
        response = client.servers.create(
            name=f"compat-{run_id}-off",
            server_type=state["server_type"],
            image=state["image"],
            ssh_keys=[SSHKey(name=state["ssh_key"].name)],
            start_after_create=False,
            public_net=ServerCreatePublicNetwork(enable_ipv4=True, enable_ipv6=False),
            labels=owner,
        )
        report.equal("start_after_create=False: no next_actions", response.next_actions, [])
        response.action.wait_until_finished()
        server = client.servers.get_by_id(response.server.id)
        report.equal("start_after_create=False: server ends off", server.status, "off")
        report.check("enable_ipv6=False: IPv4 only", server.public_net.ipv4 is not None and server.public_net.ipv6 is None, server.public_net)
        server.delete().wait_until_finished()

        # Without SSH keys the API generates a root password.
        response = client.servers.create(
            name=f"compat-{run_id}-pw", server_type=state["server_type"], image=state["image"], labels=owner
        )
        report.check(
            "no ssh_keys: root_password returned",
            isinstance(response.root_password, str) and len(response.root_password) >= 8,
            response.root_password and "<redacted>",
        )
        response.action.wait_until_finished()
        wait_all(report, "no ssh_keys", response.next_actions)
        response.server.delete().wait_until_finished()

    def cleanup() -> None:
        key = state.get("ssh_key")
        if key is not None:
            report.check("delete the SSH key", key.delete() is True)
            report.api_error("get_by_id of the deleted key", lambda: client.ssh_keys.get_by_id(key.id), "not_found")
        # Servers first: deleting a server detaches its firewalls.
        for srv in client.servers.get_all(label_selector=selector):
            srv.delete().wait_until_finished()
        for fw in client.firewalls.get_all(label_selector=selector):
            fw.delete()
        for key in client.ssh_keys.get_all(label_selector=selector):
            key.delete()
        leftover = (
            client.servers.get_all(label_selector=selector)
            + client.firewalls.get_all(label_selector=selector)
            + client.ssh_keys.get_all(label_selector=selector)
        )
        report.equal("nothing of this run is left", leftover, [])

    started = time.monotonic()
    report.run("authentication", authentication)
    report.run("catalog", catalog)
    report.run("ssh_keys", ssh_keys)
    report.run("pagination", pagination)
    report.run("firewalls", firewalls)
    report.run("servers", servers)
    report.run("server variants", server_variants)
    report.run("cleanup", cleanup)

    elapsed = time.monotonic() - started
    print(f"\nhcloud-python {hcloud.__version__}: {report.passed} checks passed, {len(report.failures)} failed ({elapsed:.1f} s)")
    for failure in report.failures:
        print(f"  - {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
