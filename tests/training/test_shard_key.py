"""Label shards are keyed by everything they depend on, so a rerun never reuses stale labels."""

from __future__ import annotations

import dataclasses

from adakv_vllm.training import main
from adakv_vllm.training.labels import LabelSettings
from adakv_vllm.training.main import shard_key


def test_shard_key_changes_with_model_quantizer_settings_and_windows(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 576}')
    base = LabelSettings()
    key = shard_key(str(model), base, [0, 300])
    assert key == shard_key(str(model), LabelSettings(), [0, 300])
    others = {
        shard_key(str(model), dataclasses.replace(base, group_size=32), [0, 300]),
        shard_key(str(model), dataclasses.replace(base, horizon=16), [0, 300]),
        shard_key(str(model), base, [0, 301]),
        shard_key("HuggingFaceTB/SmolLM2-360M", base, [0, 300]),
    }
    with monkeypatch.context() as m:  # another quantizer: same settings, other labels and features
        m.setattr(main, "QUANTIZER_ID", "another-quantizer")
        others.add(shard_key(str(model), base, [0, 300]))
    (model / "config.json").write_text('{"hidden_size": 960}')  # another model in the same folder
    others.add(shard_key(str(model), base, [0, 300]))
    assert key not in others and len(others) == 6
