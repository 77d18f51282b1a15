"""What a new user sees from `ijepa-fast train`: a line at once, never a long silence (the heartbeat),
and at the end every file the run wrote."""
from conftest import run_cli

from ijepa_fast.runlog.output import Heartbeat, Progress, _console


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_heartbeat_speaks_only_after_a_silence():
    clock = Clock()
    beat = Heartbeat(every=4.0, enabled=False, clock=clock)
    with beat:
        clock.now += 3.9
        assert beat.due(clock.now) is None
        clock.now += 0.2
        assert beat.due(clock.now) == "... setting up (4 s)"
        assert beat.due(clock.now + 3.0) is None  # it counts as output: the next one 4 s later
        bar = Progress(256, 40, enabled=False)
        bar.update(1)  # the bar moved (the console's own clock): quiet for 4 s from then
        at = _console["at"]
        assert beat.due(at + 3) is None
        assert beat.due(at + 5) == f"... step 42 of 256 running ({at + 5 - beat.t0:.0f} s)"
        bar.close()
        assert beat.due(at + 10).startswith("... finishing (")


def test_demo_says_at_once_what_it_does_and_lists_every_file(tmp_path):
    proc = run_cli("train", "--steps", "9", "run.checkpoint_every=3", "run.keep_last=2", "run.monitor_every=0",
                   cwd=tmp_path)
    assert proc.stderr.splitlines()[0] == "ijepa-fast train: setting up"
    run_dir = next((tmp_path / "runs").iterdir())
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert {"config.yaml", "train.log", "metrics.jsonl", "metrics.csv", "loss.png", "jepa-latest.pth.tar",
            "jepa-step00000006.pth.tar", "jepa-step00000009.pth.tar"} <= set(files)
    out = proc.stdout.split("files written (")[1]
    assert out.startswith(f"{len(files)}):")
    listed = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ")]
    assert listed == files
