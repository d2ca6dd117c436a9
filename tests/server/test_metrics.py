"""The exposition: in-process (the observer, bounded labels) and of a real `parley serve`
after a turn (names, labels, no user or conversation id anywhere)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import pytest
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from protocol import frames as f
from server.app import metrics
from server.dev import embedded
from server.dev.client import Client
from server.edge.observer import Observer
from server.redis.eventlog import encode
from tests.helpers.auth import mint
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

REQUIRED = (
    "parley_process_info",
    "parley_ws_sockets_open",
    "parley_ws_handshakes_total",
    "parley_ws_closes_total",
    "parley_ws_frames_written_total",
    "parley_ws_bytes_written_total",
    "parley_bus_events_received_total",
    "parley_joins_total",
    "parley_turns_total",
    "parley_turn_queue_wait_seconds_bucket",
    "gen_ai_server_time_to_first_token_seconds_bucket",
    "gen_ai_server_request_duration_seconds_bucket",
    "gen_ai_server_time_per_output_token_seconds_bucket",
    "gen_ai_client_token_usage_bucket",
    "parley_model_time_to_first_chunk_seconds_bucket",
    "parley_generations_finished_total",
    "parley_persister_lag_seconds_bucket",
    "parley_bus_delivery_lag_seconds_bucket",
    "parley_event_loop_lag_seconds_bucket",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
)


def exposition_of(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def scrape(url: str) -> dict[str, float]:
    return metrics.samples(text_string_to_metric_families(exposition_of(url)))


def total(flat: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for key, value in flat.items()
        if key.startswith(name + "{") and all(w in key for w in wanted)
    )


STAGE = "parley_first_token_stage_seconds"


def published(event: f.ServerFrame, seq: int) -> bytes:
    """An event as the append script publishes it: `{"seq":N,` spliced in front."""
    return f.splice_seq(encode(event), seq)


def test_observer_measures_first_token_once_per_generation() -> None:
    metrics.MODELS.configure(["known-model"])
    observer = Observer()
    conversation, message = uuid.uuid4(), uuid.uuid4()
    before = metrics.TTFT.labels("known-model")._sum.get()
    count = total(metrics.samples(metrics.REGISTRY.collect()), metrics.TTFT._name + "_count")
    start = f.Start(
        conversation=conversation,
        message_id=message,
        model="known-model",
        accepted_at=time.time() - 0.25,
    )
    observer.frame(published(start, 1))
    for seq in (2, 3):
        token = f.Token(conversation=conversation, message_id=message, text="hi")
        framed = observer.frame(published(token, seq))
        assert framed[0] == 0x81  # still the socket's text frame
    flat = metrics.samples(metrics.REGISTRY.collect())
    assert total(flat, metrics.TTFT._name + "_count") == count + 1
    assert metrics.TTFT.labels("known-model")._sum.get() - before >= 0.25


def test_unconfigured_model_names_are_other() -> None:
    metrics.MODELS.configure(["known-model"])
    observer = Observer()
    conversation, message = uuid.uuid4(), uuid.uuid4()
    model = f"client-chosen-{uuid.uuid4().hex}"
    start = f.Start(
        conversation=conversation, message_id=message, model=model, accepted_at=time.time()
    )
    observer.frame(published(start, 1))
    observer.frame(published(f.Token(conversation=conversation, message_id=message, text="x"), 2))
    text = metrics.exposition().decode()
    assert model not in text
    assert 'gen_ai_request_model="other"' in text


def test_observer_times_a_first_token_to_the_sockets_write() -> None:
    observer = Observer()
    observer.flush = lambda: True  # a socket had the token to write
    conversation, message = uuid.uuid4(), uuid.uuid4()
    stage = metrics.FIRST_TOKEN_STAGE.labels("write")
    count = stage._sum.get(), sample_count(stage)
    start = f.Start(conversation=conversation, message_id=message, model="m", accepted_at=1.0)
    observer.frame(published(start, 1))
    observer.frame(published(f.Token(conversation=conversation, message_id=message, text="a"), 2))
    time.sleep(0.01)  # the bus dispatches it after the rest of the frame's handling
    observer.dispatched()
    observer.frame(published(f.Token(conversation=conversation, message_id=message, text="b"), 3))
    observer.dispatched()  # a later token is no first token
    assert sample_count(stage) == count[1] + 1
    assert stage._sum.get() - count[0] >= 0.01


def test_a_first_token_no_socket_had_to_write_is_no_write_sample() -> None:
    """Its only listeners were SSE streams: the hub's flush wrote nothing."""
    observer = Observer()
    observer.flush = lambda: False
    conversation, message = uuid.uuid4(), uuid.uuid4()
    stage = metrics.FIRST_TOKEN_STAGE.labels("write")
    before = sample_count(stage)
    start = f.Start(conversation=conversation, message_id=message, model="m", accepted_at=1.0)
    observer.frame(published(start, 1))
    observer.frame(published(f.Token(conversation=conversation, message_id=message, text="a"), 2))
    observer.dispatched()
    assert sample_count(stage) == before


def test_observer_flushes_a_first_token_as_soon_as_its_sockets_have_it() -> None:
    """A generation's first token is written once the bus has dispatched it (`dispatched`),
    not with the rest of the read; other frames wait for the hub's flush."""
    observer = Observer()
    flushes: list[int] = []
    observer.flush = lambda: flushes.append(len(flushes)) is None
    conversation, message = uuid.uuid4(), uuid.uuid4()
    start = f.Start(conversation=conversation, message_id=message, model="m", accepted_at=1.0)
    observer.frame(published(start, 1))
    observer.dispatched()
    assert flushes == []
    for seq, text in ((2, "a"), (3, "b")):
        token = f.Token(conversation=conversation, message_id=message, text=text)
        observer.frame(published(token, seq))
        observer.dispatched()
    assert flushes == [0]  # the first token only


def sample_count(histogram: Histogram) -> float:
    counts = [s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count")]
    return counts[0]


def test_a_generation_that_ends_without_tokens_is_forgotten() -> None:
    observer = Observer()
    conversation, message = uuid.uuid4(), uuid.uuid4()
    start = f.Start(conversation=conversation, message_id=message, model="m", accepted_at=1.0)
    observer.frame(published(start, 1))
    done = f.Done(conversation=conversation, message_id=message, reason="cancelled")
    observer.frame(published(done, 2))
    assert not observer._waiting


@pytest.mark.e2e  # a real `parley serve`: the slow tier
async def test_serve_exposes_the_turn_without_ids(cluster: Cluster) -> None:
    # A Redis database of its own: this server's worker, not another test's, takes the turn.
    own_db = redis_db(cluster.services.redis_url, Db.METRICS)
    parley = cluster.process("serve", REDIS_URL=own_db)
    try:
        await exposes_the_turn_without_ids(parley)
    finally:
        parley.stop()


async def exposes_the_turn_without_ids(parley: ParleyProcess) -> None:
    user = f"metrics-user-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(parley.ws_url, mint(user))
    created = await client.request(f.Create(title="metrics"))
    conversation = created.conversation
    await client.request(f.Join(conversation=conversation))
    start = len(client.frames)
    ack = await client.request(f.Say(conversation=conversation, text="count me [sim:tokens=5]"))
    await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)

    deadline = time.monotonic() + 10
    flat = await asyncio.to_thread(scrape, parley.url)
    while total(flat, "parley_persisted_turns_total") == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        flat = await asyncio.to_thread(scrape, parley.url)
    names = {key.partition("{")[0] for key in flat}
    assert not [name for name in REQUIRED if name not in names]
    assert total(flat, "parley_process_info", role="serve") == 1
    assert total(flat, "parley_ws_sockets_open") >= 1
    assert total(flat, "parley_ws_handshakes_total", outcome="101") >= 1
    assert total(flat, "gen_ai_server_time_to_first_token_seconds_count") >= 1
    assert total(flat, "gen_ai_client_token_usage_count", gen_ai_token_type="output") >= 1
    assert total(flat, "parley_turns_total", outcome="ok") >= 1
    assert total(flat, "parley_ws_frames_written_total") >= 5

    text = await asyncio.to_thread(exposition_of, parley.url)
    await client.close()
    for secret in (user, str(conversation), str(ack.message_id), "count me"):
        assert secret not in text


LOOP_LAG = "parley_event_loop_lag_seconds"


@pytest.mark.e2e  # a real `parley web`: the slow tier
async def test_web_samples_its_event_loop_lag(cluster: Cluster) -> None:
    """A web process idle for half a second has sampled its loop's lag a few times (every
    `metrics.loop_lag_interval`, here 0.05 s), each far shorter than that half second."""
    web = cluster.process("web", PARLEY_METRICS_LOOP_LAG_INTERVAL="0.05")
    try:
        await asyncio.sleep(0.5)
        flat = await asyncio.to_thread(scrape, web.url)
    finally:
        web.stop()
    assert total(flat, f"{LOOP_LAG}_count") >= 3
    assert total(flat, f"{LOOP_LAG}_sum") < 0.5


@pytest.mark.e2e  # real `parley web` and `parley worker` processes: the slow tier
async def test_web_and_worker_time_the_first_token_stage_by_stage(cluster: Cluster) -> None:
    """Each process exposes the stages of Parley's time to first token it sees, observed
    once for the one turn: the web its `accept` and `write`, the worker `claim`, `start`
    and `append`; each shorter than the turn itself."""
    redis = {"REDIS_URL": redis_db(cluster.services.redis_url, Db.FIRST_TOKEN_STAGES)}
    web = cluster.process("web", **redis)
    port = embedded.free_port()
    worker = cluster.process("worker", PARLEY_WORKER_METRICS_PORT=str(port), **redis)
    try:
        client = await Client.connect(web.ws_url, mint(f"stages-{uuid.uuid4().hex[:8]}"))
        created = await client.request(f.Create(title="stages"))
        await client.request(f.Join(conversation=created.conversation))
        sent = time.monotonic()
        await client.request(f.Say(conversation=created.conversation, text="hi [sim:tokens=3]"))
        await client.wait_for(lambda fr: isinstance(fr, f.Done))
        turn = time.monotonic() - sent
        await client.close()
        seen = {
            "web": await asyncio.to_thread(scrape, web.url),
            "worker": await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}"),
        }
    finally:
        worker.stop()
        web.stop()
    stages = {"web": ("accept", "write"), "worker": ("claim", "start", "append")}
    for process, names in stages.items():
        for stage in names:
            count = total(seen[process], f"{STAGE}_count", stage=stage)
            assert count == 1, (process, stage)
            assert 0 <= total(seen[process], f"{STAGE}_sum", stage=stage) < turn, stage
        assert total(seen[process], f"{LOOP_LAG}_count") >= 1, process
