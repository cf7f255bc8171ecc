"""The ``kipam`` commands for clusters: what a bootstrap script runs.

``kipam cluster plan|show|list|render|delete``, ``kipam template list|show|create|delete``,
``kipam node allocate|release``, ``kipam vip allocate|release`` and
``kipam egress allocate|release``, over the gRPC ClusterService (:mod:`service.client`).
Output and exit codes are those of :mod:`service.commands`; ``cluster render`` writes the
YAML itself whatever ``--output`` says, so it can be piped into ``kubectl apply -f -``.

``kipam node allocate`` takes many nodes (arguments, or ``--nodes-from FILE``, ``-`` for
stdin) and asks for them concurrently; on a terminal a progress bar runs on stderr, piped
it stays silent.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, Final

from tqdm import tqdm

from service.clusters import ClusterSettings, EgressIdentity
from service.commands import emit, key_values
from service.errors import InvalidRequestError
from service.render import TARGETS
from service.rest import text
from service.rest.schemas import AllocationOut, ClusterOut, TemplateOut

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from service.client import KipamClient
    from service.clusters import Cluster, Template
    from service.models import Allocation

__all__ = ["add_cluster_commands"]

CLUSTER_EXAMPLES: Final = """\
examples:
  kipam pool create eu1 --cidr fd3c:9e12:7a00::/40
  kipam cluster plan eu1-prod --from eu1 --dry-run
  kipam cluster plan eu1-prod --from eu1 --pod-prefix-length 52 --node-prefix-length 64
  kipam cluster plan eu1-ds --from eu1 --from-ipv4 eu1-v4 --template dual-stack
  kipam cluster plan eu1-big --from eu1 --template ipv6-cluster-pool --set routing_mode=tunnel
  kipam cluster render eu1-prod cilium-values > cilium-values.yaml
  kipam cluster render eu1-prod kubeadm > kubeadm-networking.yaml
  kipam node allocate eu1-prod worker-1 worker-2 --output json
  kipam node allocate eu1-prod --nodes-from nodes.txt
  kipam egress allocate eu1-prod tenant-a --label app=billing
  kipam cluster delete eu1-prod --force
"""

# Template settings with a flag of their own; everything else goes through --set.
_LENGTH_FLAGS: Final = (
    "block_prefix_length",
    "node_cidr_prefix_length",
    "pod_prefix_length",
    "node_prefix_length",
    "service_prefix_length",
    "ingress_prefix_length",
    "egress_prefix_length",
)
_FLAG_HELP: Final = {
    "block_prefix_length": "the cluster block (default /48)",
    "node_cidr_prefix_length": "the node role's pool: node addresses (default /64)",
    "pod_prefix_length": "the pod prefix, sliced per node (default /52)",
    "node_prefix_length": "each node's pod prefix (default /64)",
    "service_prefix_length": "the service range (default /112)",
    "ingress_prefix_length": "load-balancer VIPs (default /112)",
    "egress_prefix_length": "egress-gateway addresses (default /120)",
}
_CONCURRENCY: Final = 16


def add_cluster_commands(commands: Any, command: Callable[..., Any]) -> None:
    """Add the cluster, template, node, vip and egress commands."""
    _add_cluster(commands, command)
    _add_template(commands, command)
    _add_holders(commands, command)


def _add_cluster(commands: Any, command: Callable[..., Any]) -> None:
    cluster = commands.add_parser(
        "cluster", help="plan, show, render or delete a cluster's address plan"
    )
    clusters = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    plan = command(
        clusters,
        "plan",
        _plan,
        help="carve a cluster block and its five role pools, all or nothing",
        epilog=CLUSTER_EXAMPLES,
    )
    plan.add_argument("name", help="the cluster's name (a DNS-1123 label)")
    plan.add_argument("--from", dest="parent", required=True, metavar="POOL", help="IPv6 site pool")
    plan.add_argument("--from-ipv4", metavar="POOL", help="IPv4 site pool (dual-stack)")
    plan.add_argument("--template", help="a built-in or stored template (default ipv6)")
    for name in _LENGTH_FLAGS:
        plan.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=int, metavar="N", help=_FLAG_HELP[name]
        )
    plan.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any other setting: {', '.join(_other_settings())}",
    )
    plan.add_argument("--dry-run", action="store_true", help="show what would be taken")
    command(clusters, "show", _show, help="show a cluster", epilog=CLUSTER_EXAMPLES).add_argument(
        "name"
    )
    command(clusters, "list", _list, help="list clusters", epilog=CLUSTER_EXAMPLES)
    render = command(
        clusters,
        "render",
        _render,
        help="a cluster's configuration as YAML",
        epilog=CLUSTER_EXAMPLES,
    )
    render.add_argument("name")
    render.add_argument("target", choices=TARGETS)
    delete = command(
        clusters,
        "delete",
        _delete,
        help="release everything a cluster holds",
        epilog=CLUSTER_EXAMPLES,
    )
    delete.add_argument("name")
    delete.add_argument(
        "--force", action="store_true", help="even while nodes still hold pod prefixes"
    )


def _add_template(commands: Any, command: Callable[..., Any]) -> None:
    template = commands.add_parser("template", help="list, show, store or delete cluster templates")
    templates = template.add_subparsers(dest="template_command", metavar="COMMAND", required=True)
    command(templates, "list", _template_list, help="built-in and stored templates")
    command(templates, "show", _template_show, help="one template's settings").add_argument("name")
    create = command(templates, "create", _template_create, help="store a template")
    create.add_argument("name")
    create.add_argument("--base", help="the template it starts from (default ipv6)")
    create.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--description", default="")
    command(templates, "delete", _template_delete, help="delete a stored template").add_argument(
        "name"
    )


def _add_holders(commands: Any, command: Callable[..., Any]) -> None:
    node = commands.add_parser("node", help="a node's pod prefixes")
    nodes = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    for name, handler, what in (
        ("allocate", _node_allocate, "the nodes' pod prefixes (idempotent)"),
        ("release", _node_release, "release the nodes' pod prefixes (into quarantine)"),
    ):
        sub = command(nodes, name, handler, help=what, epilog=CLUSTER_EXAMPLES)
        sub.add_argument("cluster")
        sub.add_argument("nodes", nargs="*", metavar="NODE")
        sub.add_argument(
            "--nodes-from", metavar="FILE", help="node names, one per line ('-': stdin)"
        )
        sub.add_argument("--concurrency", type=int, default=_CONCURRENCY, help="calls in flight")
    vip = commands.add_parser("vip", help="a Service's load-balancer VIPs")
    vips = vip.add_subparsers(dest="vip_command", metavar="COMMAND", required=True)
    for name, handler, what in (
        ("allocate", _vip_allocate, "a Service's VIPs (idempotent)"),
        ("release", _vip_release, "release a Service's VIPs"),
    ):
        sub = command(vips, name, handler, help=what)
        sub.add_argument("cluster")
        sub.add_argument("service", metavar="NAMESPACE/NAME")
        if name == "allocate":
            sub.add_argument("--ipv4", action="store_true", help="also an IPv4 VIP")
    egress = commands.add_parser("egress", help="an application identity's egress address")
    egresses = egress.add_subparsers(dest="egress_command", metavar="COMMAND", required=True)
    for name, handler, what in (
        ("allocate", _egress_allocate, "an identity's egress address (sticky)"),
        ("release", _egress_release, "release an identity's egress addresses"),
    ):
        sub = command(egresses, name, handler, help=what, epilog=CLUSTER_EXAMPLES)
        sub.add_argument("cluster")
        sub.add_argument("namespace")
        sub.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", required=True)
        if name == "allocate":
            sub.add_argument("--ipv4", action="store_true", help="an IPv4 address instead")


def _other_settings() -> list[str]:
    return [n for n in ClusterSettings.__dataclass_fields__ if n not in _LENGTH_FLAGS]


def _cluster_table(cluster: ClusterOut) -> str:
    rows = [
        (role, pool.name, pool.cidr, pool.policy.default_length or "")
        for pools in (cluster.pools, cluster.ipv4_pools)
        for role, pool in pools.items()
    ]
    blocks = cluster.block + (f", {cluster.ipv4_block}" if cluster.ipv4_block else "")
    head = (
        f"cluster {cluster.name}: block {blocks} (template {cluster.template}, "
        f"revision {cluster.revision})\n"
    )
    return head + text.table(["ROLE", "POOL", "CIDR", "DEFAULT LENGTH"], rows)


def _clusters(args: argparse.Namespace, clusters: list[Cluster], *, one: bool) -> None:
    out = [ClusterOut.from_model(c) for c in clusters]
    if one:
        emit(args, out[0], _cluster_table(out[0]))
        return
    rows = [(c.name, c.block, c.ipv4_block or "", c.template, c.node_prefix_length) for c in out]
    emit(args, out, text.table(["NAME", "BLOCK", "IPV4 BLOCK", "TEMPLATE", "NODE LENGTH"], rows))


def _templates(args: argparse.Namespace, templates: list[Template], *, one: bool) -> None:
    out = [TemplateOut.from_model(t) for t in templates]
    if one:
        rows = sorted((k, str(v)) for k, v in out[0].settings.items())
        emit(
            args,
            out[0],
            f"template {out[0].name}: {out[0].description}\n"
            + text.table(["SETTING", "VALUE"], rows),
        )
        return
    listed = [(t.name, "yes" if t.builtin else "", t.description) for t in out]
    emit(args, out, text.table(["NAME", "BUILT-IN", "DESCRIPTION"], listed))


def _allocations(args: argparse.Namespace, items: list[Allocation]) -> None:
    out = [AllocationOut.from_model(a) for a in items]
    emit(args, out, text.allocations(out))


async def _plan(client: KipamClient, args: argparse.Namespace) -> None:
    overrides = key_values(args.set, "--set")
    for name in _LENGTH_FLAGS:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = str(value)
    cluster, _ = await client.plan_cluster(
        args.name,
        parent=args.parent,
        parent_ipv4=args.from_ipv4,
        template=args.template,
        overrides=overrides,
        dry_run=args.dry_run,
    )
    _clusters(args, [cluster], one=True)


async def _show(client: KipamClient, args: argparse.Namespace) -> None:
    _clusters(args, [await client.get_cluster(args.name)], one=True)


async def _list(client: KipamClient, args: argparse.Namespace) -> None:
    found: list[Cluster] = []
    token = ""
    while True:
        page = await client.list_clusters(page_size=1000, page_token=token)
        found += page.items
        if page.next_cursor is None:
            break
        token = page.next_cursor
    _clusters(args, found, one=False)


async def _render(client: KipamClient, args: argparse.Namespace) -> None:
    sys.stdout.write(await client.render_cluster(args.name, args.target))


async def _delete(client: KipamClient, args: argparse.Namespace) -> None:
    cluster = await client.delete_cluster(args.name, force=args.force)
    if args.output == "table":
        sys.stdout.write(f"cluster {cluster.name} deleted (block {cluster.block.cidr})\n")
    else:
        emit(args, {"deleted": cluster.name}, "")


async def _template_list(client: KipamClient, args: argparse.Namespace) -> None:
    _templates(args, await client.list_templates(), one=False)


async def _template_show(client: KipamClient, args: argparse.Namespace) -> None:
    _templates(args, [await client.get_template(args.name)], one=True)


async def _template_create(client: KipamClient, args: argparse.Namespace) -> None:
    template, _ = await client.create_template(
        args.name,
        base=args.base,
        overrides=key_values(args.set, "--set"),
        description=args.description,
    )
    _templates(args, [template], one=True)


async def _template_delete(client: KipamClient, args: argparse.Namespace) -> None:
    await client.delete_template(args.name)
    if args.output == "table":
        sys.stdout.write(f"template {args.name} deleted\n")
    else:
        emit(args, {"deleted": args.name}, "")


def _node_names(args: argparse.Namespace) -> list[str]:
    names = list(args.nodes)
    if args.nodes_from:
        if args.nodes_from == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.nodes_from, encoding="utf-8") as source:  # noqa: PTH123
                lines = source.read().splitlines()
        names += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not names:
        raise InvalidRequestError("Name at least one node (or --nodes-from FILE).", field="node")
    if args.concurrency < 1:
        raise InvalidRequestError("--concurrency must be at least 1.", field="concurrency")
    return list(dict.fromkeys(names))  # once each, in the order given


async def _each_node(
    args: argparse.Namespace, call: Callable[[str], Any], what: str
) -> list[Allocation]:
    """``call`` per node, ``--concurrency`` at a time, with a progress bar on a terminal."""
    names = _node_names(args)
    results: dict[str, list[Allocation]] = {}
    gate = asyncio.Semaphore(args.concurrency)
    # disable=None: tqdm turns itself off when stderr is not a terminal (piped, in CI).
    with tqdm(total=len(names), desc=what, unit="node", disable=None, leave=False) as bar:

        async def one(name: str) -> None:
            async with gate:
                results[name] = await call(name)
                bar.update()

        try:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    group.create_task(one(name))
        except BaseExceptionGroup as failed:
            # The first failure stops the rest; it is what the command reports (one line).
            raise failed.exceptions[0] from None
    return [a for name in names for a in results[name]]


async def _node_allocate(client: KipamClient, args: argparse.Namespace) -> None:
    held = await _each_node(
        args, lambda node: client.allocate_node(args.cluster, node), "allocating"
    )
    _allocations(args, held)


async def _node_release(client: KipamClient, args: argparse.Namespace) -> None:
    released = await _each_node(
        args, lambda node: client.release_node(args.cluster, node), "releasing"
    )
    _allocations(args, released)


def _service(value: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep:
        raise InvalidRequestError(
            f"{value!r} is not NAMESPACE/NAME (e.g. default/web).", field="service"
        )
    return namespace, name


async def _vip_allocate(client: KipamClient, args: argparse.Namespace) -> None:
    namespace, name = _service(args.service)
    _allocations(args, await client.allocate_service(args.cluster, namespace, name, ipv4=args.ipv4))


async def _vip_release(client: KipamClient, args: argparse.Namespace) -> None:
    namespace, name = _service(args.service)
    _allocations(args, await client.release_service(args.cluster, namespace, name))


async def _egress_allocate(client: KipamClient, args: argparse.Namespace) -> None:
    identity = EgressIdentity(args.namespace, key_values(args.label, "--label"))
    _allocations(args, [await client.allocate_egress(args.cluster, identity, ipv4=args.ipv4)])


async def _egress_release(client: KipamClient, args: argparse.Namespace) -> None:
    identity = EgressIdentity(args.namespace, key_values(args.label, "--label"))
    _allocations(args, await client.release_egress(args.cluster, identity))
