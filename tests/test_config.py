from __future__ import annotations

import pytest

from sensor.config import SensorConfig
from sensor.errors import ConfigError


def test_profiles_load():
    default = SensorConfig.from_yaml("configs/sensors/default.yaml")
    assert (default.cfa, default.bit_depth, default.max_dn) == ("RGGB", 12, 4095)
    mono = SensorConfig.from_yaml("configs/sensors/mono10.yaml")
    assert (mono.cfa, mono.bit_depth) == ("mono", 10)


@pytest.mark.parametrize("data, field", [
    ({"bit_depth": 11}, "bit_depth"),
    ({"cfa": "RGBG"}, "cfa"),
    ({"cfa": "mono"}, "quantum_efficiency"),
    ({"quantum_efficiency": {"R": 0.5, "G": 1.5, "B": 0.4}}, "quantum_efficiency.G"),
    ({"read_noise_e": -1}, "read_noise_e"),
    ({"full_well_e": "lots"}, "full_well_e"),
    ({"bit_depth": 12.0}, "bit_depth"),
    ({"exposure_s": 0}, "exposure_s"),
    ({"black_level_dn": 5000}, "black_level_dn"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError) as err:
        SensorConfig.from_dict(data, "my.yaml")
    assert err.value.field == field
    assert "my.yaml" in str(err.value) and field in str(err.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("bit_depth: [12\n")
    with pytest.raises(ConfigError, match="s.yaml"):
        SensorConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="missing.yaml"):
        SensorConfig.from_yaml(tmp_path / "missing.yaml")


def test_overrides_set_nested_fields_and_name_bad_ones():
    from sensor.configio import apply_overrides

    base = {"pipeline": {"batch_size": 8}, "sensor": {"path": "a.yaml"}}
    out = apply_overrides(base, ["pipeline.batch_size=32", "key.rotation=true", "sensor.path=b.yaml"])
    assert out == {"pipeline": {"batch_size": 32}, "sensor": {"path": "b.yaml"}, "key": {"rotation": True}}
    assert base["pipeline"]["batch_size"] == 8, "input untouched"
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(base, ["pipeline.batch_size"])
    with pytest.raises(ConfigError, match="'batch_size' to be a section"):
        apply_overrides(base, ["pipeline.batch_size.x=1"])
