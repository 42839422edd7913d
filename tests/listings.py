"""The official state-dict listings kept as fixtures (tests/fixtures/*_state_dict_keys.txt), read by section."""

import re
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def listing_section(path: Path, section: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
    """{key: (shape, dtype)} and the parameter count of one `## <section> -- ... N params` part of a listing."""
    entries, params, inside = {}, None, False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line.startswith(f"## {section} ")
            if inside:
                params = int(re.search(r"([\d,]+) params", line).group(1).replace(",", ""))
        elif inside and line.strip():
            key, shape, dtype = re.fullmatch(r"(\S+) \(([\d, ]*)\) (\w+)", line).groups()
            entries[key] = (tuple(int(n) for n in shape.split(",") if n.strip()), dtype)
    return entries, params
