"""The platform service, for real: EINIT at launch, launch control, and the private
channel that binds each enclave to the identity the service measured.

Two services (hosts a and b of the shared test world) run for the whole module;
tests that restart a service make their own host.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_fixtures import (
    PROBE_MODULE,
    World,
    children_of,
    image_files,
    make_image,
    pid_alive,
    shared_world,
    signed,
    wait_until,
    write_image,
)

from migsgx.channel import ECALL_FRAME_MAX, IMAGE_FRAME_MAX, LAUNCH
from migsgx.datapath.checkpoint import CheckpointOut, restore_enclave
from migsgx.enclave.sealing import POLICY_MRENCLAVE, POLICY_MRSIGNER
from migsgx.errors import (
    ConnectionClosedError,
    CounterError,
    ImageMeasurementError,
    ImageSignatureError,
    ImageUnsignedError,
    LaunchError,
    MigSGXError,
    ReportMacError,
    SealError,
)
from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import ServiceProcess, start_service
from migsgx.sgx.ca import load_root
from migsgx.sgx.image import SIGNATURE, EnclaveImage, mr_signer_of
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.sgx.quote import verify_quote
from migsgx.sgx.structs import (
    KEYNAME_SEAL,
    KEYPOLICY_MRENCLAVE,
    KEYPOLICY_MRSIGNER,
    KeyRequest,
    ReportBody,
)
from migsgx.wire import HEADER, encode, recv_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


@pytest.fixture(scope="module")
def services(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    run = tmp_path_factory.mktemp("platform-service")
    a = start_service(world.host_a.state_dir, socket_path=run / "a.sock")
    try:
        b = start_service(world.host_b.state_dir, socket_path=run / "b.sock")
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def host_a(services: tuple[ServiceProcess, ServiceProcess]) -> ServiceProcess:
    return services[0]


@pytest.fixture(scope="module")
def host_b(services: tuple[ServiceProcess, ServiceProcess]) -> ServiceProcess:
    return services[1]


@pytest.fixture(scope="module")
def probe(world: World) -> EnclaveImage:
    return make_image(world.author)


@pytest.fixture(scope="module")
def bystander(host_a: ServiceProcess, probe: EnclaveImage) -> Iterator[EnclaveClient]:
    """An enclave that lives through the whole module, whatever others send."""

    client = EnclaveClient.launch(probe, socket_path=host_a.socket)
    yield client
    client.destroy()


Launcher = Callable[..., EnclaveClient]


@pytest.fixture
def launch(host_a: ServiceProcess, probe: EnclaveImage) -> Iterator[Launcher]:
    clients: list[EnclaveClient] = []

    def start(image: EnclaveImage | None = None, on: ServiceProcess | None = None) -> EnclaveClient:
        client = EnclaveClient.launch(image or probe, socket_path=(on or host_a).socket)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.destroy()


def _identity(
    world: World, image: EnclaveImage, host: EmulatedPlatform | None = None
) -> ReportBody:
    return (host or world.host_a).einit(image)[0]


def _no_new_enclave(service: ServiceProcess, before: set[int]) -> bool:
    return wait_until(lambda: set(children_of(service.process.pid)) <= before, timeout=10)


# --- EINIT at launch --------------------------------------------------------------------
def _tampered_code(image: EnclaveImage) -> EnclaveImage:
    files = dict(image.files)
    files[f"{PROBE_MODULE}.py"] += b"\n# one more line\n"
    return EnclaveImage.from_files(files)


def _garbled_signature(image: EnclaveImage) -> EnclaveImage:
    files = dict(image.files)
    sig = bytearray(files[SIGNATURE])
    sig[-10] ^= 0xFF
    files[SIGNATURE] = bytes(sig)
    return EnclaveImage.from_files(files)


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda img: EnclaveImage.from_files(image_files()), ImageUnsignedError, "not signed"),
        (_tampered_code, ImageMeasurementError, "measurement"),
        (_garbled_signature, ImageSignatureError, "signature"),
    ],
    ids=["unsigned", "tampered", "bad-signature"],
)
def test_launch_refuses_bad_images(
    host_a: ServiceProcess,
    probe: EnclaveImage,
    make: Callable[[EnclaveImage], EnclaveImage],
    error: type[MigSGXError],
    words: str,
) -> None:
    before = set(children_of(host_a.process.pid))
    with pytest.raises(error, match=words):
        EnclaveClient.launch(make(probe), socket_path=host_a.socket)
    assert _no_new_enclave(host_a, before)


def test_launch_of_a_tampered_image_directory(
    host_a: ServiceProcess, probe: EnclaveImage, tmp_path: Path
) -> None:
    image_dir = write_image(tmp_path / "img", probe)
    (image_dir / "extra.py").write_bytes(b"import os\n")
    with pytest.raises(ImageMeasurementError):
        EnclaveClient.launch(image_dir, socket_path=host_a.socket)


def _raw_launch_reply(service: ServiceProcess, payload: bytes, *, shut: bool = False) -> Any:
    """Send raw bytes to the launch socket; return the reply frame, or None on EOF."""

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(service.socket))
        sock.sendall(payload)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        try:
            return recv_frame(sock, LAUNCH, max_size=ECALL_FRAME_MAX)
        except ConnectionClosedError:
            return None


FLOAT_SIZE = b"[enclave]\nname = 'x'\nentry = 'm:C'\nmemory_size = 1.5\n"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (HEADER.pack(7) + b"\xff" * 7, "frame"),
        (HEADER.pack(0xFFFFFFFF), "frame"),  # refused before the body
        (encode({"t": "err", "id": 0, "code": "x", "message": "y"}), "protocol"),
        (encode({"t": "launch", "files": {"a": "text"}}), "launch"),
        (encode({"t": "launch", "files": {1: b"x"}}), "launch"),
        (encode({"t": "launch", "files": {}}), "image"),
        (encode({"t": "launch", "files": {"../x": b"", "manifest.toml": b""}}), "image"),
        (encode({"t": "launch", "files": {"manifest.toml": FLOAT_SIZE}}), "image"),
        (encode({"t": "launch", "files": {}, "extra": 1}), "frame"),
        (encode({"t": "ecall", "id": 1, "fn": "echo", "args": []}), "frame"),
    ],
    ids=["garbled", "oversize", "not-a-launch", "text-file", "int-name", "no-files",
         "traversal", "float-size", "extra-field", "ecall-frame"],
)  # fmt: skip
def test_garbage_on_the_launch_socket(
    host_a: ServiceProcess, bystander: EnclaveClient, payload: bytes, code: str
) -> None:
    reply = _raw_launch_reply(host_a, payload)
    assert reply is not None and reply["t"] == "err" and reply["code"] == code
    assert bystander.ecall.echo("unaffected") == "unaffected"


def test_half_frames_and_hangups_on_the_launch_socket(
    host_a: ServiceProcess, launch: Launcher, bystander: EnclaveClient
) -> None:
    assert _raw_launch_reply(host_a, b"", shut=True) is None
    assert _raw_launch_reply(host_a, HEADER.pack(100) + b"\xa1", shut=True)["code"] == "frame"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(host_a.socket))  # and leave without a word
    assert bystander.ecall.echo(1) == 1
    assert launch().ecall.echo(1) == 1  # and it goes on launching enclaves


def test_launch_control(world: World, tmp_path: Path) -> None:
    state = tmp_path / "strict-host"
    EmulatedPlatform.init(state, world.ca, host_id="strict")
    signer = mr_signer_of(world.author).hex()
    service = start_service(
        state,
        socket_path=tmp_path / "strict.sock",
        extra_args=["--no-debug", "--allow-signer", signer],
    )
    try:
        with pytest.raises(LaunchError, match="debug"):
            EnclaveClient.launch(make_image(world.author, debug=True), socket_path=service.socket)
        with pytest.raises(LaunchError, match="MRSIGNER"):
            EnclaveClient.launch(make_image(world.other_author), socket_path=service.socket)
        with EnclaveClient.launch(make_image(world.author), socket_path=service.socket) as ok:
            assert ok.ecall.echo(1) == 1
    finally:
        service.stop()


# --- keys: only one's own, whatever the enclave sends -------------------------------------------
def _seal_request(body: ReportBody, policy: int, key_id: bytes) -> KeyRequest:
    return KeyRequest(
        KEYNAME_SEAL, key_policy=policy, isv_svn=body.isv_svn, cpu_svn=body.cpu_svn, key_id=key_id
    )


def test_enclave_gets_exactly_its_own_keys(
    world: World, launch: Launcher, probe: EnclaveImage
) -> None:
    sibling_image = make_image(world.author, name="sibling")
    mine, sibling = launch(), launch(sibling_image)
    me, sib = _identity(world, probe), _identity(world, sibling_image)
    key_id = bytes([3]) * 32
    for policy in (KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER):
        expected = world.host_a.egetkey(me, _seal_request(me, policy, key_id))
        assert mine.ecall.seal_key(policy, key_id) == expected
    # MRENCLAVE keys differ between the two enclaves of one author; MRSIGNER keys agree.
    assert mine.ecall.seal_key(KEYPOLICY_MRENCLAVE, key_id) != sibling.ecall.seal_key(
        KEYPOLICY_MRENCLAVE, key_id
    )
    assert mine.ecall.seal_key(KEYPOLICY_MRSIGNER, key_id) == sibling.ecall.seal_key(
        KEYPOLICY_MRSIGNER, key_id
    )
    assert sibling.ecall.seal_key(KEYPOLICY_MRENCLAVE, key_id) == world.host_a.egetkey(
        sib, _seal_request(sib, KEYPOLICY_MRENCLAVE, key_id)
    )


def test_higher_svn_key_refused_through_the_service(launch: Launcher) -> None:
    client = launch()
    with pytest.raises(MigSGXError, match="ISVSVN"):
        client.ecall.seal_key(KEYPOLICY_MRSIGNER, bytes(32), 2)
    assert len(client.ecall.seal_key(KEYPOLICY_MRSIGNER, bytes(32), 0)) == 16


def test_the_private_channel_takes_no_identity_from_the_enclave(
    world: World, launch: Launcher, probe: EnclaveImage
) -> None:
    """Enclave code writes its own frames on the platform channel, claiming another
    enclave's identity in every way the protocol could be bent."""

    victim_image = make_image(world.other_author, name="victim")
    victim = _identity(world, victim_image)
    key_id = bytes(32)
    victim_keys = {
        world.host_a.egetkey(victim, _seal_request(victim, p, key_id))
        for p in (KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER)
    }
    attacker = launch()
    request = _seal_request(victim, KEYPOLICY_MRSIGNER, key_id).pack()

    # A second "init" naming the victim is refused; the channel stays bound to the attacker.
    reinit = attacker.ecall.raw_platform(
        {"t": "init", "files": dict(victim_image.files), "identity": victim.pack()}
    )
    assert reinit[0] == "reply" and reinit[1]["t"] == "err"
    for policy in (KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER):
        assert attacker.ecall.seal_key(policy, key_id) not in victim_keys
    # Replies and unknown requests from the enclave side are refused too.
    for frame in ({"t": "ok", "value": request}, {"t": "err", "code": "x", "message": "y"}):
        reply = attacker.ecall.raw_platform(frame)
        assert reply[0] == "reply" and reply[1]["t"] == "err"
    short = attacker.ecall.raw_platform({"t": "getkey", "request": request[:100]})
    assert short[1]["t"] == "err"
    # An identity smuggled as an extra field ends the channel: no key comes back.
    smuggled = attacker.ecall.raw_platform(
        {"t": "getkey", "request": request, "identity": victim.pack()}
    )
    assert smuggled[0] == "failed" or smuggled[1]["t"] == "err"
    with pytest.raises(MigSGXError):
        attacker.ecall.seal_key(KEYPOLICY_MRSIGNER, key_id)
    # The victim, launched now, still has its keys.
    victim_client = launch(victim_image)
    assert victim_client.ecall.seal_key(KEYPOLICY_MRSIGNER, key_id) in victim_keys


# --- attestation ------------------------------------------------------------------------------
def test_remote_attestation_through_the_service(
    world: World, launch: Launcher, host_b: ServiceProcess, probe: EnclaveImage
) -> None:
    data = bytes(range(64))
    roots = [load_root(world.ca_dir)]
    me = _identity(world, probe)
    quote_a = launch().ecall.quote(data)
    verified = verify_quote(
        quote_a, roots, expected_mr_enclave=me.mr_enclave, expected_mr_signer=me.mr_signer
    )
    assert verified.body.report_data == data
    assert verified.body.isv_prod_id == 7
    assert verified.pck_subject == "CN=migsgx PCK a,O=migsgx"
    quote_b = launch(on=host_b).ecall.quote(data)
    assert verify_quote(quote_b, roots).pck_subject == "CN=migsgx PCK b,O=migsgx"
    with pytest.raises(MigSGXError):
        launch().ecall.quote(bytes(63))


def test_local_attestation_between_enclaves(
    world: World, launch: Launcher, host_b: ServiceProcess
) -> None:
    alice = launch()
    bob = launch(make_image(world.author, name="bob"))
    carol = launch(make_image(world.author, name="carol"))
    data = b"\x42" * 64
    report = alice.ecall.report_for(bob.ecall.target(), data)
    body = ReportBody.unpack(bob.ecall.verify_report(report))
    assert body.mr_enclave == alice.info.mr_enclave and body.report_data == data
    with pytest.raises(ReportMacError):
        carol.ecall.verify_report(report)
    # Bob's twin on another host cannot verify it either.
    bob_b = launch(make_image(world.author, name="bob"), on=host_b)
    with pytest.raises(ReportMacError):
        bob_b.ecall.verify_report(report)
    tampered = bytearray(report)
    tampered[320] ^= 1  # report data
    with pytest.raises(ReportMacError):
        bob.ecall.verify_report(bytes(tampered))


# --- sealing ----------------------------------------------------------------------------------
def test_sealing_across_enclaves_and_hosts(
    world: World, launch: Launcher, host_b: ServiceProcess
) -> None:
    mine = launch()
    sibling = launch(make_image(world.author, name="sibling"))
    by_enclave = mine.ecall.seal(b"secret", POLICY_MRENCLAVE)
    by_signer = mine.ecall.seal(b"secret", POLICY_MRSIGNER)
    assert mine.ecall.unseal(by_enclave) == b"secret"
    assert sibling.ecall.unseal(by_signer) == b"secret"
    with pytest.raises(SealError):
        sibling.ecall.unseal(by_enclave)
    twin_on_b = launch(on=host_b)
    for blob in (by_enclave, by_signer):
        with pytest.raises(SealError):
            twin_on_b.ecall.unseal(blob)
    stranger = launch(signed(make_image(world.author).files, world.other_author))
    with pytest.raises(SealError):
        stranger.ecall.unseal(by_signer)


# --- counters and state across a restart of the service ----------------------------------------
def test_counters_and_sealed_data_survive_a_service_restart(world: World, tmp_path: Path) -> None:
    state = tmp_path / "host"
    EmulatedPlatform.init(
        state, world.ca, host_id="restart",
        allowed_signers=[mr_signer_of(world.author), mr_signer_of(world.other_author)],
    )  # fmt: skip
    image = make_image(world.author)
    sock = tmp_path / "restart.sock"

    service = start_service(state, socket_path=sock)
    try:
        with EnclaveClient.launch(image, socket_path=sock) as client:
            cid, value = client.ecall.ctr_create(10)
            assert value == 10
            assert client.ecall.ctr_inc(cid) == 11
            assert client.ecall.ctr_inc(cid, 4) == 15
            with pytest.raises(CounterError):
                client.ecall.ctr_inc(cid, 0)
            blob = client.ecall.seal(b"kept", POLICY_MRENCLAVE)
    finally:
        service.stop()
    assert service.process.returncode is not None

    service = start_service(state, socket_path=sock)
    try:
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.ctr_read(cid) == 15
            assert client.ecall.ctr_inc(cid) == 16
            assert client.ecall.unseal(blob) == b"kept"
        with EnclaveClient.launch(make_image(world.other_author), socket_path=sock) as stranger:
            for op, args in (("ctr_read", (cid,)), ("ctr_inc", (cid,)), ("ctr_destroy", (cid,))):
                with pytest.raises(CounterError):
                    stranger.call(op, *args)
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.ctr_read(cid) == 16
            client.ecall.ctr_destroy(cid)
            with pytest.raises(CounterError):
                client.ecall.ctr_read(cid)
    finally:
        service.stop()
    assert (state / "counters.cbor").stat().st_mode & 0o777 == 0o600


def test_counters_are_per_host(launch: Launcher, host_b: ServiceProcess) -> None:
    on_a = launch()
    cid, _ = on_a.ecall.ctr_create(0)
    on_b = launch(on=host_b)
    with pytest.raises(CounterError):
        on_b.ecall.ctr_read(cid)
    assert on_a.ecall.ctr_inc(cid) == 1


def test_service_stop_ends_its_enclaves(world: World, tmp_path: Path) -> None:
    state = tmp_path / "host"
    EmulatedPlatform.init(
        state, world.ca, host_id="stop", allowed_signers=[mr_signer_of(world.author)]
    )
    sock = tmp_path / "stop.sock"
    service = start_service(state, socket_path=sock)
    try:
        client = EnclaveClient.launch(make_image(world.author), socket_path=sock)
        pid = client.info.pid
    finally:
        service.stop()
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    with pytest.raises(MigSGXError):
        client.ecall.echo(1)
    client.destroy()


def test_image_frame_cap(host_a: ServiceProcess) -> None:
    """The launch frame carries the image; its cap is the image cap, checked first."""

    reply = _raw_launch_reply(host_a, HEADER.pack(IMAGE_FRAME_MAX + 1))
    assert reply is not None and reply["code"] == "frame"


# --- unmeasured code ---------------------------------------------------------------------------
def _plant(directory: Path, module: str, marker: Path) -> None:
    """A module that records that it ran, then refuses to load."""

    directory.mkdir(exist_ok=True)
    (directory / f"{module}.py").write_text(
        f"import os\nwith open({str(marker)!r}, 'a') as f:\n"
        "    f.write(f'ran in {os.getpid()}\\n')\n"
        "raise ImportError('planted')\n"
    )


def test_no_code_beside_the_service_enters_an_enclave(world: World, tmp_path: Path) -> None:
    """A file planted in the service's working directory (numpy.py: only enclaves import
    it) must not be imported into enclave processes, where it would run unmeasured."""

    marker = tmp_path / "ran"
    _plant(tmp_path / "cwd", "numpy", marker)
    service = start_service(
        world.host_a.state_dir,
        socket_path=tmp_path / "cwd.sock",
        prefix=["env", "-C", str(tmp_path / "cwd")],
    )
    try:
        with EnclaveClient.launch(make_image(world.author), socket_path=service.socket) as c:
            assert c.ecall.echo(1) == 1
    finally:
        service.stop()
    assert not marker.exists()


def test_no_code_beside_the_service_enters_the_service(world: World, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _plant(tmp_path / "cwd", "click", marker)
    try:
        service = start_service(
            world.host_a.state_dir,
            socket_path=tmp_path / "cwd.sock",
            prefix=["env", "-C", str(tmp_path / "cwd")],
            timeout=10,
        )
    except MigSGXError:
        pass
    else:
        service.stop()
    assert not marker.exists()


def test_enclaves_outlive_a_restart_of_their_service(world: World, tmp_path: Path) -> None:
    """Issue 9, item 8: after the service is killed and started again, its running
    enclaves are taken back (reserve channel, launch ticket): usable and migratable."""

    state = tmp_path / "host"
    EmulatedPlatform.init(
        state, world.ca, host_id="reattach", allowed_signers=[mr_signer_of(world.author)]
    )
    image = make_image(world.author)
    sock = tmp_path / "reattach.sock"
    service = start_service(state, socket_path=sock)
    client = EnclaveClient.launch(image, socket_path=sock)
    try:
        cid, _ = client.ecall.ctr_create(5)
        blob = client.ecall.seal(b"before", POLICY_MRENCLAVE)
        service.process.kill()  # kill -9: the enclave process lives on (its own session)
        service.process.wait()
        service = start_service(state, socket_path=sock)
        # Every platform service again, bound to the identity measured at launch.
        assert client.ecall.ctr_inc(cid) == 6
        assert client.ecall.unseal(blob) == b"before"
        verified = verify_quote(client.ecall.quote(b"r" * 64), [load_root(world.ca_dir)])
        assert verified.body.mr_enclave == client.info.mr_enclave
        # A second restart: the fresh reserve channel it was given serves again.
        service.process.kill()
        service.process.wait()
        service = start_service(state, socket_path=sock)
        assert client.ecall.ctr_inc(cid) == 7
        # Migratable: a checkpoint written and committed, then restored.
        (tmp_path / "ck").mkdir()
        out = CheckpointOut(client.detach(), client.info, client.image_files)
        out.write(tmp_path / "ck", 0)
        out.commit()
        back, info, files = restore_enclave(tmp_path / "ck", 0, sock)
        with EnclaveClient(back, info, image_files=files) as restored:
            assert restored.ecall.ctr_read(cid) == 7
    finally:
        client.destroy()
        service.stop()


def test_a_forged_reattach_ticket_is_refused(world: World, tmp_path: Path) -> None:
    state = tmp_path / "host"
    EmulatedPlatform.init(state, world.ca, host_id="forged")
    platform = EmulatedPlatform(state)
    identity, _ = platform.einit(make_image(world.author))
    ticket = platform.reattach_ticket(identity)
    assert platform.reattach_identity(identity.pack(), ticket) == identity
    forged = bytearray(ticket)
    forged[-1] ^= 1
    assert platform.reattach_identity(identity.pack(), bytes(forged)) is None
    other, _ = platform.einit(make_image(world.other_author))
    assert platform.reattach_identity(other.pack(), ticket) is None  # not its identity
