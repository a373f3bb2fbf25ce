"""docs/usage.md's table of every option, made from the config dataclasses (options.py).

    python docs/options_table.py            # print it
    python docs/options_table.py --write    # rewrite it in docs/usage.md (a test checks it is current)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from options import BEGIN, END, Config, FlowerConfig, ModelConfig, options_table  # noqa: E402

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def sections() -> list:
    return [("Data, clients, training and how the run is executed (`options.Config`)", Config),
            ("The methods' models (`options.ModelConfig`)", ModelConfig),
            ("Flower only: `python flower_app.py` (`options.FlowerConfig`)", FlowerConfig)]


def usage_with_table(text: str, table: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + table + text[end:]


def main(argv=None) -> int:
    table = options_table(sections())
    if "--write" in (sys.argv[1:] if argv is None else argv):
        USAGE.write_text(usage_with_table(USAGE.read_text(), table))
        print(f"wrote the options table in {USAGE}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
