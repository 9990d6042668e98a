"""The baseline switches every model-level test runs through, shared so the lists cannot drift apart."""

from avgn_fast.config import AVGNConfig

TINY = AVGNConfig.from_name("tiny")
SWITCHES = {
    "avgn": {},
    "visual_only": {"audio": False},
    "uniform": {"temporal": "uniform"},
    "center": {"spatial": "center"},
    "random": {"spatial": "random"},
    "dense": {"dense": True},
    "dense_visual": {"dense": True, "audio": False},
    "audio_only": {"visual": False},
}
