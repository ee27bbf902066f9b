"""What the ids that never go back cost a publish: the publish script with its
clock floor (``TIME``, and ``SET`` when the clock is ahead of the counter)
against the same script with the counter alone, on one redis-server.

    python benchmarks/id_floor.py [--publishes 20000] [--out DIR]

Both scripts run from one process, in alternating blocks of 100 (ABBA...),
on the same keys, so that the machine's drift falls on both alike. Writes
``id_floor.json`` and ``id_floor.md`` to ``--out`` (default
``benchmarks/results/redis_ha``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from harness.servers import RedisServer  # noqa: E402
from wsgi_hijack.redis_bus import _PUBLISH  # noqa: E402

# The counter alone: what the script was before ids had a floor (with the
# same formatting of the id, which large ids need either way).
_COUNTER_ONLY = _PUBLISH.replace("""local now = redis.call('TIME')
local id = redis.call('INCR', KEYS[1])
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
if id < clock then
  id = clock
  redis.call('SET', KEYS[1], string.format('%.0f', id))
end
id = string.format('%.0f', id)""", "local id = string.format('%.0f', redis.call('INCR', KEYS[1]))")
BLOCK = 100


def measure(client: redis.Redis, publishes: int) -> dict[str, list[float]]:
    scripts = {"clock floor": client.register_script(_PUBLISH),
               "counter alone": client.register_script(_COUNTER_ONLY)}
    keys = ["bench:id", "bench:s:c", "bench:c:c", "bench:ev:c"]
    args = [b"x" * 100, b"", repr(time.time()), 1000]
    times: dict[str, list[float]] = {name: [] for name in scripts}
    order = list(scripts)
    for block in range(2 * publishes // BLOCK):
        name = order[block % 4 in (1, 2)]  # ABBA ABBA ...
        script = scripts[name]
        for _ in range(BLOCK):
            start = time.perf_counter()
            script(keys=keys, args=args, client=client)
            times[name].append((time.perf_counter() - start) * 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=20000, help="per script")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/redis_ha")
    args = parser.parse_args(argv)
    assert _COUNTER_ONLY != _PUBLISH, "the publish script changed: update _COUNTER_ONLY"
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        try:
            client = redis.Redis(port=server.port)
            client.config_set("appendfsync", "everysec")
            times = measure(client, args.publishes)
        finally:
            server.kill()
    rows = {name: {"p50_us": round(statistics.median(t), 2),
                   "mean_us": round(statistics.fmean(t), 2), "publishes": len(t)}
            for name, t in times.items()}
    floor, alone = rows["clock floor"], rows["counter alone"]
    result = {"command": "python benchmarks/id_floor.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows,
              "ratio_p50": round(floor["p50_us"] / alone["p50_us"], 3),
              "difference_p50_us": round(floor["p50_us"] - alone["p50_us"], 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "id_floor.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# What ids that never go back cost a publish", "",
        f"- Command: `{result['command'].strip()}`; {result['date']}; one redis-server "
        "(`appendfsync everysec`), one process, the two scripts in alternating blocks of "
        f"{BLOCK} on the same keys.", "",
        "| script | publishes | p50 µs | mean µs |", "|---|---|---|---|",
        *(f"| {name} | {r['publishes']:,} | {r['p50_us']} | {r['mean_us']} |"
          for name, r in rows.items()), "",
        f"The clock floor (`TIME`, and `SET` when the clock is ahead) is "
        f"{result['difference_p50_us']:+.2f} µs at p50, {result['ratio_p50']:.3f} x the "
        "counter alone.", ""]
    (args.out / "id_floor.md").write_text("\n".join(lines))
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
