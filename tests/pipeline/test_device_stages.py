"""The model actor's device stages: every cascade on the actor's one cascade thread, and on
CUDA on a stream of its own, after its chunk's encoder work.

No GPU here: torch.cuda's Stream, Event and stream context are replaced by fakes that log
what the stages ask of them, which is the protocol that matters (an event after the
encoder work, on the encoding thread's stream; the cascade queued after it on its own
stream; that stream synchronised before the features can be freed, even on an error).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from jobs.pipeline.compute import cascade_chunk, encode_chunk
from jobs.pipeline.device_stages import CascadeStream, DeviceStages
from persam_core.speed.acceleration import EncoderSpeed
from persam_core.concept import ConceptTensors
from persam_core.evaluation.metrics import iou
from persam_core.modeling.resize import resize_longest_side
from sample_tools import load_pair, make_chunk, segment_chunk


class FakeCuda:
    """Stand-ins for torch.cuda.Stream / Event / stream / current_stream, logging (what, stream, thread)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.current = threading.local()
        owner = self

        class Stream:
            def __init__(self, device=None, priority: int = 0) -> None:
                self.name, self.priority = "cascade", priority

            def wait_event(self, event) -> None:
                owner.note("wait", event.recorded_on)

            def synchronize(self) -> None:
                owner.note("synchronize", self.name)

        class Event:
            def record(self, stream) -> None:
                self.recorded_on = stream
                owner.note("record", stream)

        self.Stream, self.Event = Stream, Event

    def note(self, what: str, stream) -> None:
        self.log.append((what, getattr(stream, "name", stream), threading.get_ident()))

    def current_stream(self, device=None):
        return getattr(self.current, "stream", "default")

    @contextlib.contextmanager
    def stream(self, stream):
        before = self.current_stream()
        self.current.stream = stream
        try:
            yield
        finally:
            self.current.stream = before


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    for name in ("Stream", "Event", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_every_cascade_runs_on_the_one_cascade_thread():
    """Ray calls come on two threads; torch keeps CUDA graphs per thread, so the cascades
    (where decoder graphs are recorded and replayed) all run on the actor's one thread."""
    stages, decoded_on = DeviceStages(torch.device("cpu")), []
    run = lambda: stages.run(lambda: None, lambda _: decoded_on.append(threading.get_ident()))  # noqa: E731
    callers = [threading.Thread(target=run) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(decoded_on) == 4 and len(set(decoded_on)) == 1
    assert decoded_on[0] not in {caller.ident for caller in callers}


def test_the_cascade_runs_on_its_own_stream_after_the_encoder_work(cuda):
    stages = DeviceStages(torch.device("cuda"))
    result = stages.run(lambda: cuda.note("encode", cuda.current_stream()) or "features",
                        lambda features: cuda.note("decode", cuda.current_stream()) or f"masks of {features}")
    assert result == "masks of features"
    steps = [(what, stream) for what, stream, _ in cuda.log]
    assert steps == [("encode", "default"), ("record", "default"), ("wait", "default"),
                     ("decode", "cascade"), ("synchronize", "cascade")]
    caller, threads = threading.get_ident(), [thread for _, _, thread in cuda.log]
    assert threads[:2] == [caller, caller] and caller not in threads[2:]  # the cascade: on the cascade thread
    assert stages.cascade_stream.stream.priority < 0  # scheduled before the encoder's kernels


def test_the_cascade_stream_is_synchronised_when_a_cascade_fails(cuda):
    def failing(features):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        DeviceStages(torch.device("cuda")).run(lambda: "features", failing)
    assert cuda.log[-1][:2] == ("synchronize", "cascade")  # before the features can be freed


def test_without_a_cascade_thread_the_cascade_runs_on_the_caller_still_on_its_stream(cuda):
    """The local runner: one call at a time, so the cascade runs on the calling thread
    (which keeps the process's allocator tuning on CPU), on the cascade stream as before."""
    stages = DeviceStages(torch.device("cuda"), cascade_thread=False)
    stages.run(lambda: cuda.note("encode", cuda.current_stream()), lambda _: cuda.note("decode", cuda.current_stream()))
    assert [(what, stream) for what, stream, _ in cuda.log] == [
        ("encode", "default"), ("record", "default"), ("wait", "default"), ("decode", "cascade"), ("synchronize", "cascade")]
    assert {thread for _, _, thread in cuda.log} == {threading.get_ident()}
    stages.close()


def test_the_local_runner_runs_its_cascades_on_its_own_thread(monkeypatch):
    import jobs.pipeline.run as run

    class Probe:
        scores_only = False

        def __init__(self, job, threads: int, stage_threads: bool = True) -> None:
            self.stages = DeviceStages(torch.device("cpu"), cascade_thread=stage_threads)

        def __call__(self, batch: dict) -> dict:
            return {"meta": batch["meta"], "results": [self.stages.run(lambda: None, lambda _: threading.get_ident())]}

    monkeypatch.setattr(run, "prepare_chunk", lambda chunk, job: {"meta": chunk, "arrays": None})
    monkeypatch.setattr(run, "finish_chunk", lambda row, job, scores_only: row["results"])
    assert list(run.local_stream(None, Probe, [{}, {}])) == [threading.get_ident()] * 2


def test_off_cuda_there_is_no_stream():
    lanes = CascadeStream(torch.device("cpu"))
    assert lanes.stream is None and lanes.mark_encoded() is None
    with lanes.running_after(None):
        pass


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only: no CUDA device here"))])
def test_two_callers_through_the_stages_get_the_masks_of_one_chunk_after_another(
        device, tiny_sam, concept_tensors, perseg_sample):
    """The real stages (on CUDA: the cascade stream, its event and sync) with two chunks in
    flight compute what the chunks give one after another on one thread."""
    model = copy.deepcopy(tiny_sam).to(device).eval()
    concepts = [ConceptTensors.on(concept_tensors[name].concept, device) for name in ("cat", "duck_f")]
    pictures = [resize_longest_side(load_pair(perseg_sample, name, "01")[0]) for name in ("cat", "duck_toy", "colorful_sneaker")]
    chunks = [make_chunk([(f"{index}.jpg", None, r)]) for index, r in enumerate(pictures)]
    speed = EncoderSpeed()
    one_by_one = [segment_chunk(model, chunk, concepts, speed).masks for chunk in chunks]
    stages = DeviceStages(torch.device(device))
    with ThreadPoolExecutor(max_workers=2) as callers:
        staged = list(callers.map(lambda chunk: stages.run(lambda: encode_chunk(model, chunk, speed),
                                                           lambda done: cascade_chunk(model, *done, concepts)).masks, chunks))
    stages.close()
    for alone, together in zip(one_by_one, staged):
        assert len(alone) == len(together) == 2  # 1 image x 2 concepts
        assert (alone.image_index == together.image_index).all() and (alone.concept_index == together.concept_index).all()
        assert min(iou(alone.mask(row), together.mask(row)) for row in range(len(alone))) >= 0.999
