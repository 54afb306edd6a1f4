"""Two real processes (2 CPU devices each, gloo collectives) train like one with 4 devices."""
import os
import re
import socket

import numpy as np

import test_utils as tu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    hf_dir = tu.make_hf_dir(str(tmp_path / "tiny_t5"))
    args = (["--config=configs/plugin.py:stage=pretrain", f"--config.backbone={hf_dir}"]
            + tu.cli_flags({**tu.TINY_OVERRIDES, **tu.TINY_CORPUS, "mesh.data": -1,
                            "total_steps": 8, "lr": 1e-2}))
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [tu.train_py(args + [f"--workdir={single}"], devices=4)]
    procs += [tu.train_py(args + [f"--workdir={multi}", f"--coordinator_address=127.0.0.1:{port}",
                                  "--num_processes=2", f"--process_id={i}"], devices=2)
              for i in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "{'data': 4, 'model': 1} over 4 device(s) (cpu), 2 process(es)" in outs[1][0]
    # Only process 0 prints, logs and writes outputs. Gloo's C++ threads print their own
    # connection lines to stdout ("[Gloo] Rank 1 is connected to 1 peer ranks. Expected number
    # of connected peer ranks is : 1"), interleaved with each other even inside a word or
    # number: what is left once their words and digits are taken out must be nothing.
    gloo = r"\[Gloo\]|Rank|is|connected|to|peer|ranks|Expected|number|of|[\d.:]"
    assert not re.sub(gloo, "", outs[2][0]).split(), outs[2][0]

    a = tu.read_plugin(os.path.join(single, "plugin"))
    b = tu.read_plugin(os.path.join(multi, "plugin"))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=2e-6, err_msg=key)
    la, lb = tu.read_metrics(single)[-1], tu.read_metrics(multi)[-1]
    assert la["step"] == lb["step"] == 8
    np.testing.assert_allclose(lb["loss"], la["loss"], rtol=1e-5)
