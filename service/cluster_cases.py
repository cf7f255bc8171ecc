"""The cluster use cases: plan, show, render, delete, and what a cluster's controllers hold.

A plan runs as one exclusive transaction (:meth:`service.usecases.Kipam.exclusive`) over the
site pools: the engine takes each block, :func:`service.clusters.layout` places the roles in
it, :func:`service.clusters.check` runs every Kubernetes and Cilium rule, and only then are
the blocks, the role pools and the cluster row written. A dry run does exactly the same and
rolls back, so it shows what would be taken. A repeated plan of the same cluster answers the
existing one.

Per-node pod prefixes, per-Service VIPs and per-identity egress addresses are allocations in
the role pools, owned by ``node/<node>``, ``service/<namespace>/<name>`` and
``egress/<namespace>/<labels>``. Each owner holds at most one per pool: a repeated request
answers the held one; concurrent requests share one idempotency key
(:func:`service.clusters.node_key`), so only one is made. A released egress address stays
its identity's during the pool's quarantine: asking again gives the same address back.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Final

from engine.errors import ClusterCheckError
from service import render as renderer
from service.clusters import (
    BUILTIN_TEMPLATES,
    CLUSTER_ROLES,
    DEFAULT_TEMPLATE,
    Cluster,
    ClusterSettings,
    EgressIdentity,
    Template,
    check,
    check_cluster_name,
    check_settings,
    layout,
    node_key,
    resolve,
)
from service.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    LockTimeoutError,
    PreconditionFailedError,
    ResourceNotFoundError,
)
from service.models import (
    DEFAULT_QUARANTINE_S,
    Allocation,
    AllocationRequest,
    Page,
    Pool,
    PoolPolicy,
    RequestContext,
    check_labels,
)
from service.observe import Observer, traced
from service.store import ALLOCATION_COLUMNS, POOL_COLUMNS, allocation_from_row, pool_from_row
from service.usecases import POOL_FROM

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import asyncpg

    from engine import Prefix
    from service.usecases import Kipam, LockedPool, Session

__all__ = ["Clusters"]

_log = logging.getLogger(__name__)

_MAX_PAGE: Final = 1000
# How often a holder request reads the history again when its row was released meanwhile.
_HOLD_ATTEMPTS: Final = 5
# A Kubernetes object name (DNS-1123 subdomain) for nodes, and a DNS-1123 label for a
# Service's namespace and name: what the owner strings are made of.
_NODE_MAX: Final = 253


def _check_node(name: object) -> str:
    if (
        not isinstance(name, str)
        or len(name) > _NODE_MAX
        or not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name
        )
    ):
        raise InvalidRequestError(
            f"node {name!r} is not a Kubernetes node name (a DNS-1123 subdomain: lower-case "
            "letters, digits, '-' and '.', at most 253 characters).",
            field="node",
        )
    return name


def _check_label_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value):
        raise InvalidRequestError(
            f"{what} {value!r} is not a DNS-1123 label (at most 63 lower-case letters, digits "
            "and '-', starting and ending alphanumeric).",
            field=what,
        )
    return value


class Clusters:
    """Cluster plans and templates, over a :class:`~service.usecases.Kipam`."""

    def __init__(self, kipam: Kipam) -> None:
        self.kipam = kipam
        self.db = kipam.db

    @property
    def observer(self) -> Observer:
        """The use cases' observer (metrics)."""
        return self.kipam.observer

    # -- templates -------------------------------------------------------------------------------

    async def template(self, name: str | None) -> Template:
        """A built-in or stored template; None or empty means the default (``ipv6``).

        Raises:
            ResourceNotFoundError: no template of that name.
        """
        name = name or DEFAULT_TEMPLATE
        if name in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[name]
        check_cluster_name(name, "template")
        row = await self.db.fetchrow(
            "SELECT name, description, settings FROM cluster_templates WHERE name = $1", name
        )
        if row is None:
            raise ResourceNotFoundError("template", name)
        return _template(row)

    async def list_templates(self) -> list[Template]:
        """The built-in templates, then the stored ones, by name."""
        rows = await self.db.fetch(
            "SELECT name, description, settings FROM cluster_templates ORDER BY name"
        )
        return [*BUILTIN_TEMPLATES.values(), *(_template(r) for r in rows)]

    @traced("create_template", pool="name", base="base")
    async def create_template(
        self,
        name: str,
        *,
        base: str | None = None,
        overrides: Mapping[str, str] | None = None,
        description: str = "",
    ) -> tuple[Template, bool]:
        """Store a template: ``base``'s settings (default ``ipv6``) with ``overrides``.

        Idempotent: the same name with the same settings answers the stored one (False).

        Raises:
            InvalidRequestError: a bad name, setting or description, or a built-in's name.
            ResourceNotFoundError: no such base.
            AlreadyExistsError: the name holds other settings.
        """
        check_cluster_name(name, "name")
        if name in BUILTIN_TEMPLATES:
            raise InvalidRequestError(
                f"{name!r} is a built-in template; choose another name.", field="name"
            )
        if len(description) > 1024 or "\x00" in description:
            raise InvalidRequestError(
                "description must be text of at most 1024 characters, without NUL.",
                field="description",
            )
        settings = resolve((await self.template(base)).settings, overrides or {})
        check_settings(settings)
        row = await self.db.fetchrow(
            """
            WITH ins AS (
                INSERT INTO cluster_templates (name, description, settings) VALUES ($1, $2, $3)
                ON CONFLICT (name) DO NOTHING RETURNING name, description, settings
            )
            SELECT true AS created, * FROM ins
            UNION ALL
            SELECT false, name, description, settings FROM cluster_templates WHERE name = $1
            LIMIT 1
            """,
            name,
            description,
            settings.to_json(),
        )
        if row is None:  # pragma: no cover - one of the two branches answers
            raise AssertionError(name)
        stored = _template(row)
        if not row["created"] and stored.settings != settings:
            raise AlreadyExistsError(
                f"Template {name!r} exists with other settings "
                f"({_difference(stored.settings, settings)}); choose another name or delete it."
            )
        return stored, bool(row["created"])

    async def delete_template(self, name: str) -> None:
        """Delete a stored template; clusters planned from it keep their settings.

        Raises:
            InvalidRequestError: a built-in template.
            ResourceNotFoundError: none.
        """
        if name in BUILTIN_TEMPLATES:
            raise InvalidRequestError(f"{name!r} is built in and cannot be deleted.", field="name")
        check_cluster_name(name, "name")
        deleted = await self.db.fetchrow(
            "DELETE FROM cluster_templates WHERE name = $1 RETURNING name", name
        )
        if deleted is None:
            raise ResourceNotFoundError("template", name)

    # -- plans -----------------------------------------------------------------------------------

    @traced("plan_cluster", pool="name", template="template", dry_run="dry_run")
    async def plan(  # noqa: PLR0913 - the request's fields
        self,
        name: str,
        *,
        parent: str,
        parent_ipv4: str | None = None,
        template: str | None = None,
        overrides: Mapping[str, str] | None = None,
        dry_run: bool = False,
        ctx: RequestContext | None = None,
    ) -> tuple[Cluster, bool]:
        """Carve a cluster: its block(s) and five role pools per family, all or nothing.

        Returns:
            The cluster (in a dry run: as it would be; its pool ids are not kept) and whether it was
            planned now (False: the same plan already exists).

        Raises:
            InvalidRequestError: a bad name, template setting or layout; every broken
                Kubernetes/Cilium rule (``ClusterCheckError``, kind INVALID, with each rule).
            PoolNotFoundError, ResourceNotFoundError: no such site pool or template.
            PoolExhaustedError: the site pool has no free block of that size.
            AlreadyExistsError: the name is taken by another plan, or by a pool.
        """
        ctx = ctx or RequestContext()
        check_cluster_name(name)
        chosen = await self.template(template)
        settings = resolve(chosen.settings, overrides or {})
        check_settings(settings)
        site, site4 = await self._sites(parent, parent_ipv4, settings)
        existing = await self._replay(name, site, site4, chosen.name, settings)
        if existing is not None:
            return existing, False

        async def work(session: Session) -> Cluster:
            return await self._plan(
                session,
                name=name,
                template=chosen.name,
                settings=settings,
                sites=(site, site4),
                ctx=ctx,
            )

        pool_ids = [site.id] + ([site4.id] if site4 else [])
        try:
            cluster = await self.kipam.exclusive(pool_ids, work, commit=not dry_run)
        except AlreadyExistsError:
            again = await self._replay(name, site, site4, chosen.name, settings)
            if again is None:
                raise
            return again, False
        if dry_run:
            return cluster, True
        self.kipam.feed.wake()
        _log.info("cluster %s planned by %s", name, ctx.actor)
        return await self.get(name), True  # as committed (generations are bumped at commit)

    async def _sites(
        self, parent: str, parent_ipv4: str | None, settings: ClusterSettings
    ) -> tuple[Pool, Pool | None]:
        """The site pools a plan carves from: IPv6, and IPv4 for dual-stack."""
        site = await self.kipam.get_pool(parent)
        await self.kipam.outside_clusters(site, "plan clusters from a site pool.")
        if site.cidr.version != 6:
            raise InvalidRequestError(
                f"The site pool {parent} is IPv{site.cidr.version}; a cluster's primary block is "
                "IPv6: name an IPv6 pool (and an IPv4 one as parent_ipv4 for dual-stack).",
                field="parent_pool",
            )
        site4: Pool | None = None
        if settings.dual_stack:
            if not parent_ipv4:
                raise InvalidRequestError(
                    "A dual-stack cluster needs an IPv4 site pool too (parent_pool_ipv4).",
                    field="parent_pool_ipv4",
                )
            site4 = await self.kipam.get_pool(parent_ipv4)
            await self.kipam.outside_clusters(site4, "plan clusters from a site pool.")
            if site4.cidr.version != 4:
                raise InvalidRequestError(
                    f"{parent_ipv4} is not an IPv4 pool.", field="parent_pool_ipv4"
                )
        elif parent_ipv4:
            raise InvalidRequestError(
                "parent_pool_ipv4 is for dual-stack clusters; this plan is IPv6-only "
                "(set family=dual-stack, or leave it out).",
                field="parent_pool_ipv4",
            )
        return site, site4

    async def _replay(
        self, name: str, site: Pool, site4: Pool | None, template: str, settings: ClusterSettings
    ) -> Cluster | None:
        """The live cluster of that name if it is this very plan; None if there is none."""
        try:
            cluster = await self.get(name)
        except ResourceNotFoundError:
            return None
        same = (
            cluster.parent == site.name
            and cluster.ipv4_parent == (site4.name if site4 else None)
            and cluster.settings == settings
        )
        if not same:
            what = _difference(cluster.settings, settings) or (
                f"site pool {cluster.parent}"
                + (f" and {cluster.ipv4_parent}" if cluster.ipv4_parent else "")
            )
            raise AlreadyExistsError(
                f"Cluster {name} exists with another plan (template {cluster.template}; differs "
                f"in {what}); delete it first or choose another name.",
                conflicts=tuple(str(b) for b in cluster.blocks()),
            )
        del template  # a plan is the same if its settings are, whatever the template's name
        return cluster

    async def _plan(  # noqa: PLR0913 - the plan's parts
        self,
        session: Session,
        *,
        name: str,
        template: str,
        settings: ClusterSettings,
        sites: tuple[Pool, Pool | None],
        ctx: RequestContext,
    ) -> Cluster:
        site, site4 = sites
        parents = [session.pool(site.id)] + ([session.pool(site4.id)] if site4 else [])
        blocks: list[Prefix] = []
        roles: dict[str, list[Prefix]] = {role: [] for role in CLUSTER_ROLES}
        for parent, site_pool in zip(parents, [site, site4], strict=False):
            assert site_pool is not None  # noqa: S101 - zip stops at the parents
            length = settings.lengths(site_pool.cidr.version)["block"]
            block = parent.engine.allocate(length)  # PoolExhaustedError says what is free
            blocks.append(block)
            for role, prefix in layout(block, settings).items():
                roles[role].append(prefix)
        allow_documentation = all(p.policy.allow_documentation for p in parents)
        violations = check(blocks, roles, settings, allow_documentation=allow_documentation)
        if violations:
            raise ClusterCheckError(violations)
        labels = {"kipam.io/cluster": name}
        block_pools: list[LockedPool] = []
        role_pools: dict[tuple[int, str], LockedPool] = {}
        for parent, block in zip(parents, blocks, strict=True):
            suffix = "" if block.version == 6 else "/ipv4"
            block_pool = await session.create_pool(
                parent=parent,
                name=f"{name}{suffix}",
                cidr=block,
                role="container",
                policy=PoolPolicy(quarantine_seconds=0, allow_documentation=allow_documentation),
                labels=labels,
                ctx=ctx,
            )
            block_pools.append(block_pool)
            for role in CLUSTER_ROLES:
                cidr = roles[role][len(block_pools) - 1]
                block_pool.engine.allocate_prefix(cidr)
                role_pools[block.version, role] = await session.create_pool(
                    parent=block_pool,
                    name=f"{name}{suffix}/{role}",
                    cidr=cidr,
                    role=role,
                    policy=_role_policy(
                        role, block.version, settings, allow_documentation=allow_documentation
                    ),
                    labels={**labels, "kipam.io/role": role},
                    ctx=ctx,
                )
        row = await session.conn.fetchrow(
            """
            WITH ins AS (
                INSERT INTO clusters (name, template, settings, block_pool_id, ipv4_block_pool_id,
                                      revision)
                VALUES ($1, $2, $3, $4, $5, nextval('kipam_revision'))
                RETURNING id, revision, created_at
            ), hist AS (
                INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation, prefix,
                                     actor, request_id, trace_id, data)
                SELECT revision, 'cluster.planned', $4, $6, 0, $7, $8, $9, $10, $11 FROM ins
            )
            SELECT revision, created_at FROM ins
            """,
            name,
            template,
            settings.to_json(),
            block_pools[0].id,
            block_pools[1].id if len(block_pools) > 1 else None,
            block_pools[0].name,
            blocks[0],
            ctx.actor,
            ctx.request_id,
            ctx.trace_id,
            {
                "template": template,
                "settings": settings.to_json(),
                "blocks": [str(b) for b in blocks],
            },
        )
        pools = await session.conn.fetch(
            f"SELECT {POOL_COLUMNS} {POOL_FROM} WHERE p.id = ANY($1::bigint[])",
            [p.id for p in (*block_pools, *role_pools.values())],
        )
        return _cluster(
            name,
            template=template,
            settings=settings,
            pools=[pool_from_row(r) for r in pools],
            block_ids=[b.id for b in block_pools],
            revision=row["revision"] if row else 0,
            created_at=row["created_at"] if row else None,
        )

    async def get(self, name: str) -> Cluster:
        """A live cluster.

        Raises:
            ResourceNotFoundError: none of that name.
        """
        check_cluster_name(name)
        row = await self.db.fetchrow(
            "SELECT name, template, settings, block_pool_id, ipv4_block_pool_id, revision,"
            " created_at FROM clusters WHERE name = $1 AND deleted_at IS NULL",
            name,
        )
        if row is None:
            raise ResourceNotFoundError("cluster", name)
        return await self._of(row)

    async def _of(self, row: asyncpg.Record) -> Cluster:
        (cluster,) = await self._all_of([row])
        return cluster

    async def _all_of(self, rows: Sequence[asyncpg.Record]) -> list[Cluster]:
        """The clusters of these rows, their pools read in one query."""
        block_ids: dict[str, list[int]] = {}
        names: list[str] = []
        for row in rows:
            name = row["name"]
            block_ids[name] = [row["block_pool_id"]] + (
                [row["ipv4_block_pool_id"]] if row["ipv4_block_pool_id"] else []
            )
            names += [name, *(f"{name}/{role}" for role in CLUSTER_ROLES)]
            if row["ipv4_block_pool_id"]:
                names += [f"{name}/ipv4", *(f"{name}/ipv4/{role}" for role in CLUSTER_ROLES)]
        found = await self.db.fetch(
            f"SELECT {POOL_COLUMNS} {POOL_FROM} WHERE p.name = ANY($2::text[])"
            " AND (p.id = ANY($1::bigint[]) OR p.parent_id = ANY($1::bigint[]))"
            " AND p.deleted_at IS NULL",
            [i for ids in block_ids.values() for i in ids],
            names,
        )
        pools = [pool_from_row(r) for r in found]
        return [
            _cluster(
                row["name"],
                template=row["template"],
                settings=ClusterSettings.from_json(row["settings"]),
                pools=[p for p in pools if p.name.split("/", 1)[0] == row["name"]],
                block_ids=block_ids[row["name"]],
                revision=row["revision"],
                created_at=row["created_at"],
            )
            for row in rows
        ]

    async def list_clusters(self, *, after: str | None = None, limit: int = 100) -> Page[Cluster]:
        """Live clusters by name; keyset pagination on the name."""
        if not 1 <= limit <= _MAX_PAGE:
            raise InvalidRequestError(f"limit must be from 1 to {_MAX_PAGE}.", field="limit")
        rows = await self.db.fetch(
            "SELECT name, template, settings, block_pool_id, ipv4_block_pool_id, revision,"
            " created_at FROM clusters WHERE deleted_at IS NULL AND ($1::text IS NULL OR name > $1)"
            " ORDER BY name LIMIT $2",
            after,
            limit + 1,
        )
        clusters = await self._all_of(rows[:limit]) if rows else []
        return Page(clusters, clusters[-1].name if len(rows) > limit else None)

    @traced("delete_cluster", pool="name", force="force")
    async def delete(
        self, name: str, *, force: bool = False, ctx: RequestContext | None = None
    ) -> Cluster:
        """Release everything the cluster holds and delete its pools; history is kept.

        Refused while nodes hold pod prefixes, unless ``force``. The blocks go back to the
        site pools through their quarantine.

        Raises:
            ResourceNotFoundError: no such cluster.
            PreconditionFailedError: nodes still hold pod prefixes (the message names some).
        """
        ctx = ctx or RequestContext()
        cluster = await self.get(name)
        parents = [await self.kipam.get_pool(cluster.parent)]
        if cluster.ipv4_parent:
            parents.append(await self.kipam.get_pool(cluster.ipv4_parent))
        blocks = [cluster.block] + ([cluster.ipv4_block] if cluster.ipv4_block else [])
        members = [*blocks, *cluster.role_pools()]

        async def work(session: Session) -> None:
            live = await session.conn.fetchval(
                "SELECT block_pool_id FROM clusters WHERE name = $1 AND deleted_at IS NULL"
                " FOR UPDATE",
                name,
            )
            if live != cluster.block.id:  # deleted (and perhaps planned again) meanwhile
                raise ResourceNotFoundError("cluster", name)
            pods = [
                cluster.pools["pod"],
                *([cluster.ipv4_pools["pod"]] if cluster.ipv4_pools else []),
            ]
            if not force:
                holders = await session.conn.fetch(
                    "SELECT DISTINCT owner FROM allocations WHERE pool_id = ANY($1::bigint[])"
                    " AND state = 'active' ORDER BY owner LIMIT 4",
                    [p.id for p in pods],
                )
                if holders:
                    names = ", ".join(r["owner"].removeprefix("node/") for r in holders[:3])
                    raise PreconditionFailedError(
                        f"Cluster {name} still has nodes holding pod prefixes ({names}"
                        f"{', ...' if len(holders) > 3 else ''}); release them (kipam node "
                        "release) or delete with force."
                    )
            for role_pool in cluster.role_pools():
                locked = session.pool(role_pool.id)
                await session.release_all(locked, ctx)
                await session.delete_pool(locked, ctx)
            for block in blocks:
                locked = session.pool(block.id)
                await session.release_all(locked, ctx)
                await session.delete_pool(locked, ctx)
            for parent, block in zip(parents, blocks, strict=True):
                allocation_id = await session.conn.fetchval(
                    "SELECT parent_allocation_id FROM pools WHERE id = $1", block.id
                )
                await session.release(session.pool(parent.id), allocation_id, ctx)
            await session.conn.execute(
                """
                WITH upd AS (
                    UPDATE clusters SET deleted_at = now() WHERE name = $1 AND deleted_at IS NULL
                    RETURNING block_pool_id
                )
                INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation, prefix,
                                     actor, request_id, trace_id, data)
                SELECT nextval('kipam_revision'), 'cluster.deleted', block_pool_id, $2, 0, $3,
                       $4, $5, $6, $7 FROM upd
                """,
                name,
                cluster.block.name,
                cluster.block.cidr,
                ctx.actor,
                ctx.request_id,
                ctx.trace_id,
                {"force": force},
            )

        await self.kipam.exclusive([p.id for p in (*parents, *members)], work, commit=True)
        self.kipam.feed.wake()
        _log.info("cluster %s deleted by %s%s", name, ctx.actor, " (forced)" if force else "")
        return cluster

    async def render(self, name: str, target: str) -> str:
        """The cluster's configuration for one target (:data:`service.render.TARGETS`)."""
        cluster = await self.get(name)
        renderer.check_target(target)
        egress = await self.egress_holders(cluster) if target == "egress-policy" else []
        vips = await self.vip_holders(cluster) if target == "lb-ippool" else []
        return renderer.render(cluster, target, egress=egress, vips=vips)

    async def _active(self, pools: Sequence[Pool]) -> list[Allocation]:
        rows = await self.db.fetch(
            f"SELECT {ALLOCATION_COLUMNS} FROM allocations a JOIN pools p ON p.id = a.pool_id"  # noqa: S608 - fixed text
            " WHERE a.pool_id = ANY($1::bigint[]) AND a.state = 'active' ORDER BY a.owner, a.id",
            [p.id for p in pools],
        )
        return [allocation_from_row(row) for row in rows]

    async def egress_holders(self, cluster: Cluster) -> list[tuple[EgressIdentity, Prefix]]:
        """Every identity holding an egress address now, with the address."""
        held = await self._active(_family_pools(cluster, "egress", ipv4=True))
        return [(EgressIdentity.of(a), a.prefix) for a in held]

    async def vip_holders(self, cluster: Cluster) -> list[tuple[str, str, Prefix]]:
        """Every Service holding a VIP now: namespace, name and the address."""
        held = await self._active(_family_pools(cluster, "ingress", ipv4=True))
        out = []
        for allocation in held:
            kind, _, rest = allocation.owner.partition("/")
            namespace, _, service = rest.partition("/")
            if kind == "service" and namespace and service:
                out.append((namespace, service, allocation.prefix))
        return out

    # -- what a cluster's controllers hold --------------------------------------------------------

    @traced("allocate_node", pool="cluster")
    async def allocate_node(
        self, cluster: str, node: str, *, ctx: RequestContext | None = None
    ) -> list[Allocation]:
        """The node's pod prefix per family (IPv6 first): the held one, or a new one."""
        found = await self.get(cluster)
        owner = f"node/{_check_node(node)}"
        return [
            await self._hold(pool, owner, {}, ctx or RequestContext(), sticky=False)
            for pool in _family_pools(found, "pod", ipv4=True)
        ]

    @traced("release_node", pool="cluster")
    async def release_node(
        self, cluster: str, node: str, *, ctx: RequestContext | None = None
    ) -> list[Allocation]:
        """Release the node's pod prefixes (into the pod pool's quarantine); idempotent."""
        found = await self.get(cluster)
        owner = f"node/{_check_node(node)}"
        return await self._let_go(_family_pools(found, "pod", ipv4=True), owner, ctx)

    @traced("allocate_service", pool="cluster")
    async def allocate_service(
        self,
        cluster: str,
        namespace: str,
        service: str,
        *,
        ipv4: bool = False,
        ctx: RequestContext | None = None,
    ) -> list[Allocation]:
        """A load-balancer VIP per family for a Service (IPv6; IPv4 too with ``ipv4``)."""
        found = await self.get(cluster)
        owner = _service_owner(namespace, service)
        if ipv4:
            _require_ipv4(found)
        return [
            await self._hold(pool, owner, {}, ctx or RequestContext(), sticky=False)
            for pool in _family_pools(found, "ingress", ipv4=ipv4)
        ]

    @traced("release_service", pool="cluster")
    async def release_service(
        self, cluster: str, namespace: str, service: str, *, ctx: RequestContext | None = None
    ) -> list[Allocation]:
        """Release a Service's VIPs; idempotent."""
        found = await self.get(cluster)
        pools = _family_pools(found, "ingress", ipv4=True)
        return await self._let_go(pools, _service_owner(namespace, service), ctx)

    @traced("allocate_egress", pool="cluster")
    async def allocate_egress(
        self,
        cluster: str,
        identity: EgressIdentity,
        *,
        ipv4: bool = False,
        ctx: RequestContext | None = None,
    ) -> Allocation:
        """An egress address for an application identity: held, reclaimed, or new.

        Sticky: within the egress pool's quarantine after a release, the identity gets the
        same address back.
        """
        found = await self.get(cluster)
        identity = _check_identity(identity)
        if ipv4:
            _require_ipv4(found)
        pool = found.ipv4_pools["egress"] if ipv4 else found.pools["egress"]
        return await self._hold(
            pool, identity.owner, identity.allocation_labels(), ctx or RequestContext(), sticky=True
        )

    @traced("release_egress", pool="cluster")
    async def release_egress(
        self, cluster: str, identity: EgressIdentity, *, ctx: RequestContext | None = None
    ) -> list[Allocation]:
        """Release an identity's egress addresses (they stay its own during quarantine)."""
        found = await self.get(cluster)
        identity = _check_identity(identity)
        return await self._let_go(_family_pools(found, "egress", ipv4=True), identity.owner, ctx)

    async def _held(self, pool: Pool, owner: str) -> list[Allocation]:
        rows = await self.db.fetch(
            f"SELECT {ALLOCATION_COLUMNS} FROM allocations a JOIN pools p ON p.id = a.pool_id"  # noqa: S608 - fixed text
            " WHERE a.pool_id = $1 AND a.owner = $2 ORDER BY a.id",
            pool.id,
            owner,
        )
        return [allocation_from_row(r) for r in rows]

    async def _hold(
        self,
        pool: Pool,
        owner: str,
        labels: dict[str, str],
        ctx: RequestContext,
        *,
        sticky: bool,
    ) -> Allocation:
        """The owner's active allocation in ``pool``: the held one, a reclaimed one, or new.

        Every new row (reclaimed or not) takes the key of the owner's next sequence number,
        so racing callers make one row and the others replay it. A replay can find that row
        already released (a stale sequence number): then the history is read again.
        """
        for _ in range(_HOLD_ATTEMPTS):
            history = await self._held(pool, owner)
            active = [a for a in history if a.state == "active"]
            if active:
                return active[-1]
            key = node_key(owner, len(history))
            held = (
                await self._reclaim(
                    pool, history=history, owner=owner, labels=labels, key=key, ctx=ctx
                )
                if sticky
                else None
            )
            if held is None:
                held, _ = await self.kipam.allocate(
                    pool.name, owner=owner, labels=labels, idempotency_key=key, ctx=ctx
                )
            if held.state == "active":
                return held
        raise LockTimeoutError(
            f"{owner} was released while being allocated, {_HOLD_ATTEMPTS} times over; retry."
        )

    async def _reclaim(  # noqa: PLR0913 - the request's parts
        self,
        pool: Pool,
        *,
        history: Sequence[Allocation],
        owner: str,
        labels: dict[str, str],
        key: str,
        ctx: RequestContext,
    ) -> Allocation | None:
        """The owner's latest quarantined prefix, made active again for it; None if none."""
        quarantined = [a for a in history if a.state == "quarantined"]
        if not quarantined:
            return None
        request = AllocationRequest(owner=owner, labels=labels, idempotency_key=key)

        async def work(session: Session) -> Allocation | None:
            locked = session.pool(pool.id)
            return await session.reclaim(locked, quarantined[-1].id, request, ctx)

        reclaimed = await self.kipam.exclusive([pool.id], work, commit=True)
        if reclaimed is not None:
            self.kipam.feed.wake()
        return reclaimed

    async def _let_go(
        self, pools: Sequence[Pool], owner: str, ctx: RequestContext | None
    ) -> list[Allocation]:
        held = [a for pool in pools for a in await self._held(pool, owner) if a.state == "active"]
        return [await self.kipam.release(a.id, ctx=ctx) for a in held]


def _template(row: asyncpg.Record) -> Template:
    return Template(
        name=row["name"],
        description=row["description"],
        settings=ClusterSettings.from_json(row["settings"]),
    )


def _difference(a: ClusterSettings, b: ClusterSettings) -> str:
    old, new = a.to_json(), b.to_json()
    return ", ".join(f"{k}: {old[k]} vs {new[k]}" for k in old if old[k] != new[k])


def _role_policy(
    role: str, version: int, settings: ClusterSettings, *, allow_documentation: bool
) -> PoolPolicy:
    bits = 128 if version == 6 else 32
    if role == "pod":
        node = settings.node_length(version)
        return PoolPolicy(
            default_length=node,
            min_length=node,
            max_length=node,
            quarantine_seconds=settings.node_quarantine_seconds,
            allow_documentation=allow_documentation,
        )
    quarantine = {
        "ingress": settings.ingress_quarantine_seconds,
        "egress": settings.egress_quarantine_seconds,
    }.get(role, DEFAULT_QUARANTINE_S)
    # Node addresses, VIPs and egress addresses are single addresses, often on a link: never
    # the subnet-router anycast address, the top 128 (RFC 2526) or IPv4 network/broadcast.
    return PoolPolicy(
        default_length=bits,
        reserve_anycast=role in {"node", "ingress", "egress"},
        quarantine_seconds=quarantine,
        allow_documentation=allow_documentation,
    )


def _cluster(  # noqa: PLR0913 - a row's parts
    name: str,
    *,
    template: str,
    settings: ClusterSettings,
    pools: Sequence[Pool],
    block_ids: Sequence[int],
    revision: int,
    created_at: object,
) -> Cluster:
    by_id = {p.id: p for p in pools}
    blocks = [by_id[i] for i in block_ids if i in by_id]
    if len(blocks) != len(block_ids):  # pragma: no cover - deleted with the cluster row
        raise ResourceNotFoundError("cluster", name)
    roles: dict[int, dict[str, Pool]] = {6: {}, 4: {}}
    for pool in pools:
        if pool.role in CLUSTER_ROLES:
            roles[pool.cidr.version][pool.role] = pool
    ipv4_block = blocks[1] if len(blocks) > 1 else None
    return Cluster(
        name=name,
        template=template,
        settings=settings,
        block=blocks[0],
        pools={r: roles[6][r] for r in CLUSTER_ROLES if r in roles[6]},
        parent=blocks[0].parent or "",
        ipv4_block=ipv4_block,
        ipv4_pools={r: roles[4][r] for r in CLUSTER_ROLES if r in roles[4]},
        ipv4_parent=ipv4_block.parent if ipv4_block else None,
        revision=revision,
        created_at=created_at,
    )


def _family_pools(cluster: Cluster, role: str, *, ipv4: bool) -> list[Pool]:
    """The role's IPv6 pool, and its IPv4 pool when asked for and the cluster has one."""
    pools = [cluster.pools[role]]
    if ipv4 and role in cluster.ipv4_pools:
        pools.append(cluster.ipv4_pools[role])
    return pools


def _require_ipv4(cluster: Cluster) -> None:
    if not cluster.ipv4_pools:
        raise InvalidRequestError(
            f"Cluster {cluster.name} is IPv6-only: it has no IPv4 pools.", field="ipv4"
        )


def _service_owner(namespace: str, service: str) -> str:
    return (
        f"service/{_check_label_name(namespace, 'namespace')}/"
        f"{_check_label_name(service, 'service')}"
    )


def _check_identity(identity: EgressIdentity) -> EgressIdentity:
    _check_label_name(identity.namespace, "namespace")
    labels = check_labels(dict(identity.labels), "labels")
    reserved = sorted(k for k in labels if k.startswith(("io.kubernetes.", "io.cilium.")))
    if reserved:
        raise InvalidRequestError(
            f"labels {', '.join(reserved)} are Kubernetes's and Cilium's own (the namespace is "
            "its own field); give the pods' labels only.",
            field="labels",
        )
    if not labels:
        raise InvalidRequestError(
            "An egress identity needs at least one pod label (Cilium selects workloads by "
            "labels; the namespace alone would match every pod in it).",
            field="labels",
        )
    if len(identity.owner) > 512:
        raise InvalidRequestError(
            "The identity's labels are too long together (over 512 characters).", field="labels"
        )
    return EgressIdentity(identity.namespace, labels)
