"""The ``migsgx`` command line: a thin shell over the library.

Only this module calls ``sys.exit``; every command maps migsgx errors to a
named exit code and a one-line message on stderr.
"""

from __future__ import annotations

import grp
import math
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .cli_output import emit as _emit
from .errors import ConfigError, ImageError, MigSGXError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_IMAGE = 4
EXIT_ATTESTATION = 5
EXIT_MIGRATION = 6  # did not move: the source runs as before
EXIT_IN_DOUBT = 7  # the outcome is not known here: run ``migsgx recover``
EXIT_SOURCE_GONE = 8  # the source ended during the migration: nothing moved, nothing runs
#: The source died while the destination still pulled process pages from it
#: (post-copy window): the destination tree was killed; the application is lost.
EXIT_SOURCE_LOST = 9
#: Committed and claimed, but the destination's enclave (or its platform service)
#: was gone when the tree was attached: the application runs without its enclave.
EXIT_LOST_AFTER_COMMIT = 10
#: Nothing moved and the source application runs, but a source enclave died before
#: the decision: its state is gone, as after a crash (``migrate``, ``checkpoint``).
EXIT_SOURCE_ENCLAVE_LOST = 11


def _exit_code(exc: MigSGXError) -> int:
    from .errors import (
        AttestationError,
        InDoubtError,
        LostAfterCommitError,
        MigrationError,
        SourceEnclaveLostError,
        SourceGoneError,
        SourceLostError,
    )

    if isinstance(exc, InDoubtError):
        return EXIT_IN_DOUBT
    if isinstance(exc, SourceEnclaveLostError):
        return EXIT_SOURCE_ENCLAVE_LOST
    if isinstance(exc, SourceLostError):
        return EXIT_SOURCE_LOST
    if isinstance(exc, LostAfterCommitError):
        return EXIT_LOST_AFTER_COMMIT
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, ImageError):
        return EXIT_IMAGE
    if isinstance(exc, AttestationError):
        return EXIT_ATTESTATION
    if isinstance(exc, SourceGoneError):
        return EXIT_SOURCE_GONE
    if isinstance(exc, MigrationError):
        return EXIT_MIGRATION
    return EXIT_ERROR


@click.group()
@click.version_option(package_name="migsgx")
def cli() -> None:
    """Secure migration of SGX enclave applications with their process or container."""


# --- ca ----------------------------------------------------------------------------
# --- platform ------------------------------------------------------------------------
@cli.group()
def platform() -> None:
    """One emulated SGX host: its root secret, attestation key and counters."""


def _signers(values: tuple[str, ...]) -> set[bytes]:
    allowed: set[bytes] = set()
    for s in values:
        try:
            raw = bytes.fromhex(s)
        except ValueError as exc:
            raise ConfigError(f"signer {s!r} is not hex") from exc
        if len(raw) != 32:
            raise ConfigError(f"signer {s!r} is not a 32-byte MRSIGNER")
        allowed.add(raw)
    return allowed


@platform.command("init")
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), required=True)
@click.option("--host-id", default=None, help="a name for this host (default: random)")
@click.option(
    "--tcb-level",
    type=click.IntRange(0, 255),
    default=None,
    help="the host's TCB level (default: the CA's highest UpToDate level)",
)
@click.option(
    "--allow-signer", "signers", multiple=True,
    help="MRSIGNER (hex) allowed to launch enclaves here; repeat for more (launch control)",
)  # fmt: skip
def platform_init(
    state: Path, ca_dir: Path, host_id: str | None, tcb_level: int | None, signers: tuple[str, ...]
) -> None:
    """Create the state of one emulated host in STATE, certified by the CA in CA_DIR."""

    from .sgx.ca import ProvisioningCA
    from .sgx.platform import EmulatedPlatform

    allowed = _signers(signers)
    p = EmulatedPlatform.init(
        state,
        ProvisioningCA.load(ca_dir),
        host_id=host_id,
        tcb_level=tcb_level,
        allowed_signers=allowed,
    )
    _emit({"state": str(state), "host_id": p.info.host_id,
           "allowed_signers": sorted(s.hex() for s in allowed)})  # fmt: skip


@platform.command("allow-signer")
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.argument("signers", nargs=-1, required=True)
def platform_allow_signer(state: Path, signers: tuple[str, ...]) -> None:
    """Add MRSIGNERs (hex) to the host's launch allow list (read when the service starts)."""

    from .sgx.platform import EmulatedPlatform

    p = EmulatedPlatform(state)
    p.allow_signers(_signers(signers))
    _emit({"state": str(state), "allowed_signers": sorted(s.hex() for s in p.allowed_signers)})


@platform.command("tcb")
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.option("--ca", "ca_dir", type=click.Path(path_type=Path), required=True)
@click.option("--level", type=click.IntRange(0, 255), required=True)
def platform_tcb(state: Path, ca_dir: Path, level: int) -> None:
    """Move the host to TCB LEVEL (a microcode update): a new PCK certificate from the CA."""

    from .sgx.ca import ProvisioningCA
    from .sgx.platform import EmulatedPlatform

    p = EmulatedPlatform(state)
    p.set_tcb_level(ProvisioningCA.load(ca_dir), level)
    _emit({"state": str(state), "host_id": p.info.host_id, "tcb_level": level})


def _finite(_ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):  # (FloatRange lets inf and nan through)
        raise click.BadParameter(f"{value} is not a number of seconds", param=param)
    return value


@platform.command("serve")
@click.option("--state", type=click.Path(path_type=Path), required=True)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None)
@click.option(
    "--allow-signer", "signers", multiple=True,
    help="MRSIGNER (hex) allowed to launch, beside the host's recorded allow list",
)  # fmt: skip
@click.option("--no-debug", is_flag=True, help="refuse to launch debug enclaves")
@click.option(
    "--no-launch-control", is_flag=True,
    help="let any signer launch (development only; the default refuses unlisted signers)",
)  # fmt: skip
@click.option(
    "--no-sandbox", is_flag=True,
    help="run enclaves without their sandbox (measurements and debugging only)",
)  # fmt: skip
@click.option(
    "--socket-group", default=None,
    help="group (name or id) that may use the socket besides the service's user",
)  # fmt: skip
@click.option(
    "--warm-spare",
    is_flag=True,
    help="keep one enclave runtime process started and self-tested for the next launch",
)
@click.option(
    "--keep-socket", type=click.FloatRange(min=0), default=300.0, show_default=True,
    callback=_finite,
    help="seconds a keeper holds the socket after the service died, for a restarted one"
    " to take back (0: none; a restart binds a new socket; finite: nothing keeps a dead"
    " service's socket for ever)",
)  # fmt: skip
def platform_serve(
    state: Path,
    socket_path: Path | None,
    signers: tuple[str, ...],
    no_debug: bool,
    no_launch_control: bool,
    no_sandbox: bool,
    socket_group: str | None,
    warm_spare: bool,
    keep_socket: float,
) -> None:
    """Run the platform service: launches enclaves and answers their requests."""

    from .sgx.platform import EmulatedPlatform
    from .sgx.service import PlatformService

    gid: int | None = None
    if socket_group is not None:
        try:
            gid = int(socket_group) if socket_group.isdigit() else grp.getgrnam(socket_group).gr_gid
        except KeyError as exc:
            raise ConfigError(f"no group {socket_group!r}") from exc
    svc = PlatformService(
        EmulatedPlatform(state),
        socket_path,
        allowed_signers=_signers(signers),
        warm_spare=warm_spare,
        allow_debug=not no_debug,
        launch_control=not no_launch_control,
        socket_group=gid,
        sandbox=False if no_sandbox else None,
        keep_socket=keep_socket,
    )
    svc.bind()
    signal.signal(signal.SIGTERM, lambda *_: svc.shutdown())
    origin = {"kept": " (the socket kept from the service before)",
              "systemd": " (the socket systemd holds)"}.get(svc.socket_origin, "")  # fmt: skip
    click.echo(f"platform {svc.platform.info.host_id} serving on {svc.socket_path}{origin}",
               err=True)  # fmt: skip
    try:
        svc.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        svc.shutdown()


# --- enclave -------------------------------------------------------------------------
@cli.group()
def enclave() -> None:
    """Enclave images: author keys, signing, measurement."""


@enclave.command("keygen")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def enclave_keygen(out: Path) -> None:
    """Create an author signing key (RSA-3072, exponent 3)."""

    from .sgx.image import generate_author_key, mr_signer_of

    if out.exists():
        raise ConfigError(f"{out} exists; refusing to overwrite a signing key")
    key = generate_author_key(out)
    _emit({"key": str(out), "mrsigner": mr_signer_of(key).hex()})


@enclave.command("sign")
@click.argument("image", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--key", type=click.Path(path_type=Path, exists=True), required=True)
def enclave_sign(image: Path, key: Path) -> None:
    """Sign IMAGE with the author KEY (writes IMAGE/enclave.sig)."""

    from .sgx.image import load_author_key, sign_image_dir

    sig = sign_image_dir(image, load_author_key(key))
    _emit({"mrenclave": sig.mr_enclave.hex(), "mrsigner": sig.mr_signer.hex()})


@enclave.command("measure")
@click.argument("image", type=click.Path(path_type=Path, exists=True, file_okay=False))
def enclave_measure(image: Path) -> None:
    """Print the image's MRENCLAVE (and MRSIGNER, when signed) as JSON."""

    from .errors import ImageUnsignedError
    from .sgx.image import EnclaveImage

    img = EnclaveImage.load(image)
    out: dict[str, Any] = {"mrenclave": img.measure().hex(), "mrsigner": None}
    try:
        out["mrsigner"] = img.sigstruct.mr_signer.hex()
    except ImageUnsignedError:
        pass
    _emit(out)


# --- bench ------------------------------------------------------------------------------
@cli.group()
def bench() -> None:
    """Benchmarks; each prints one JSON object and compares within one run."""


@bench.command("state")
@click.option("--size", default="256MiB", show_default=True, help="enclave memory to migrate")
@click.option("--chunk", default=None, help="chunk size (default: the engine's)")
@click.option("--slots", type=int, default=None, help="ring slots per side")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="paired runs; top-level figures are their medians")  # fmt: skip
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="draw the median runs' per-process timelines into this PNG")  # fmt: skip
@click.option("--ab-prefault", is_flag=True,
              help="A/B: each pipelined run also without the destination's prefault "
              "ahead of the freeze")  # fmt: skip
@click.option("--ab-policy", type=click.Choice(["batch", "other"]), default=None,
              help="A/B: each pipelined run also with every process under this "
              "scheduling policy")  # fmt: skip
@click.option("--ab-huge-pages", is_flag=True,
              help="A/B: each pipelined run also with the destination enclave's memory "
              "in 2 MiB pages")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object")
def bench_state(
    size: str,
    chunk: str | None,
    slots: int | None,
    repeat: int,
    plot_path: Path | None,
    ab_prefault: bool,
    ab_policy: str | None,
    ab_huge_pages: bool,
    as_json: bool,
) -> None:
    """Pipelined vs sequential enclave-state migration between two emulated hosts."""

    from .lab.bench.state import plot, run
    from .limits import DEFAULT_CHUNK_SIZE, DEFAULT_SLOTS
    from .sgx.image import parse_size

    try:
        nbytes = parse_size(size)
        chunk_bytes = parse_size(chunk) if chunk else DEFAULT_CHUNK_SIZE
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    result = run(
        nbytes,
        chunk_bytes,
        slots or DEFAULT_SLOTS,
        repeat=repeat,
        ab_prefault=ab_prefault,
        ab_policy=ab_policy or "",
        ab_huge_pages=ab_huge_pages,
    )
    if plot_path is not None:
        plot(result, plot_path)
    if not as_json:
        click.echo(
            f"medians of {repeat}: pipelined {result['pipelined']['seconds']:.2f} s, "
            f"sequential {result['sequential']['seconds']:.2f} s, "
            f"share of raw {result['pipelined_share_of_raw']:.2f}, "
            f"extra memory {result['pipelined']['peak_extra_bytes'] / 1024:.0f} KiB",
            err=True,
        )
    _emit(result)


from .cli_agent import register as register_agent  # noqa: E402
from .cli_lab import register as register_lab  # noqa: E402
from .cli_migrate import register as register_migration  # noqa: E402

register_agent(cli)
register_migration(cli)
register_lab(cli)

from .cli_ca import ca  # noqa: E402
from .cli_inspect import inspect_command  # noqa: E402
from .cli_platform import platform_status  # noqa: E402

cli.add_command(ca)
cli.add_command(inspect_command)
platform.add_command(platform_status)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="migsgx", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except MigSGXError as exc:
        click.echo(f"migsgx: error [{exc.code}]: {exc}", err=True)
        sys.exit(_exit_code(exc))
    except Exception as exc:  # a fault must never end in a traceback
        click.echo(f"migsgx: error [internal]: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_OK)
