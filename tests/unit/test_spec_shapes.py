"""A peer's container configuration of any shape: only the admission's refusal comes out.

``begin`` carries the source's OCI runtime specification, which the
destination admits before the source freezes (``agent/preflight.py``, each
driver's ``admit_spec``, ``containers/oci.py``'s ``localize``).  Any JSON may
arrive there: a list where an object belongs (``"process": [1]``), a number
for a name, ``null`` in a list.  Whatever hypothesis puts in any position the
admission reads, the answer is the configuration admitted or a
:class:`~migsgx.containers.ContainerError` (a
:class:`~migsgx.containers.admission.SpecRefused` naming the field, for a
misshapen one) that travels as an ``err`` frame; never another exception (the
agent logged a traceback and closed the connection without an answer).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_admission import ENGINE_SPECS, HERE

from migsgx.agent import preflight
from migsgx.containers import ContainerError, ContainerSettings, HostConfig, make_driver
from migsgx.containers.admission import SHAPE, SpecRefused, _Each
from migsgx.containers.oci import localize
from migsgx.criu import Criu
from migsgx.errors import MigSGXError, ProtocolError, error_from_wire

#: Any JSON value, small.
GARBAGE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(shape: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position the admission reads (a list's: its first item), from its shape table."""

    out = [prefix]
    if isinstance(shape, dict):
        for key, inner in shape.items():
            out += _paths(inner, (*prefix, key))
    elif isinstance(shape, list):
        out += _paths(shape[0], (*prefix, 0))
    elif isinstance(shape, _Each):
        out += _paths(shape.shape, (*prefix, "net.ipv4.ip_forward"))
    return out


PATHS = _paths(SHAPE)


def plant(spec: dict[str, Any], path: tuple[Any, ...], value: Any) -> Any:
    """``spec`` with ``value`` at ``path``, the objects and lists on the way made as needed."""

    if not path:
        return value
    node: Any = spec
    for key, after in itertools.pairwise(path):
        fresh: Any = [] if isinstance(after, int) else {}
        if isinstance(key, int):
            if not node:
                node.append(fresh)
            if not isinstance(node[key], list | dict) or isinstance(node[key], list) != isinstance(
                fresh, list
            ):
                node[key] = fresh
        elif not isinstance(node.get(key), type(fresh)):
            node[key] = fresh
        node = node[key]
    last = path[-1]
    if isinstance(last, int) and not node:
        node.append(None)
    node[last] = value
    return spec


def host(tmp: Path) -> HostConfig:
    grants = ContainerSettings(bind_sources=HERE.policy.bind_sources)  # (the specs' binds)
    return HostConfig(Criu("/bin/true"), grants, HERE.platform_socket, tmp)


TARGETS = {"runc": {"id": "kv1"}, "podman": {"name": "kv1"}, "containerd": {"id": "kv1"}}


def _only_the_admissions(exc: BaseException) -> None:
    assert isinstance(exc, ContainerError), repr(exc)
    assert exc.code in ("container-spec", "container"), exc
    back = error_from_wire(**exc.to_wire())  # (what the err frame carries)
    assert isinstance(back, MigSGXError) and back.code == exc.code


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    engine=st.sampled_from(sorted(ENGINE_SPECS)),
    path=st.sampled_from(PATHS),
    value=GARBAGE,
)
def test_garbage_anywhere_the_admission_reads_is_refused_or_admitted(
    engine: str, path: tuple[Any, ...], value: Any
) -> None:
    spec = plant(copy.deepcopy(ENGINE_SPECS[engine]), path, value)
    try:
        localize(spec, HERE)
    except Exception as exc:  # (the property: which exceptions)
        _only_the_admissions(exc)


@pytest.mark.parametrize("driver", sorted(TARGETS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=GARBAGE)
def test_begin_with_a_misshapen_spec_is_refused_by_every_engine(
    driver: str, path: tuple[Any, ...], value: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # (the same path ``begin`` takes at the destination, each driver's own admission)
    engine = make_driver(driver, host(tmp_path_factory.getbasetemp()))
    spec = plant(copy.deepcopy(ENGINE_SPECS["runc"]), path, value)
    try:
        preflight.admit(engine, TARGETS[driver], {"spec": spec})
    except Exception as exc:  # (the property: which exceptions)
        _only_the_admissions(exc)


@pytest.mark.parametrize("driver", sorted(TARGETS))
@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("process", [1]),  # (the attack's: ``_env`` called ``.get`` on a list)
        ("mounts", {"destination": "/x"}),
        ("linux", [1]),
        ("linux.namespaces", [["network", "/proc/1/ns/net"]]),
        ("linux.resources.devices", [{"allow": True, "type": "c", "major": [1], "access": "r"}]),
        ("process.capabilities.bounding", [["CAP_SYS_ADMIN"]]),
        ("annotations", None),
        ("", [1]),
    ],
)
def test_the_attacks_shapes_are_refused_naming_the_field(
    driver: str, where: str, value: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    engine = make_driver(driver, host(tmp_path_factory.getbasetemp()))
    spec = copy.deepcopy(ENGINE_SPECS["runc"])
    path = tuple(where.split(".")) if where else ()
    spec = plant(spec, path, value)
    if value is None:  # (null for an absent field: admitted)
        preflight.admit(engine, TARGETS[driver], {"spec": spec})
        return
    with pytest.raises(SpecRefused) as caught:
        preflight.admit(engine, TARGETS[driver], {"spec": spec})
    assert caught.value.code == "container-spec"
    assert caught.value.field.startswith(where or "(the configuration)"), caught.value


@pytest.mark.parametrize("ports", [5, 1.5, True])
def test_ports_that_are_not_a_list_are_refused(ports: Any, tmp_path: Path) -> None:
    with pytest.raises(ProtocolError):
        preflight.admit(make_driver("pid", host(tmp_path)), {}, {"ports": ports})
