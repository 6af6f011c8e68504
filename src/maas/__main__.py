"""``python -m maas serve …`` (``serve run`` that stops cleanly), ``python -m maas plan …``
(placement check) and ``python -m maas manifest …`` (KubeRay manifest)."""

import sys


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "plan", "manifest"):
        print("usage: python -m maas {serve,plan,manifest} ...  (see --help of each)", file=sys.stderr)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "serve":
        from maas.launch import main as serve_main

        return serve_main(rest)
    if command == "plan":
        from maas.plan import main as plan_main

        return plan_main(rest)
    from maas.manifest import main as manifest_main

    return manifest_main(rest)


if __name__ == "__main__":
    sys.exit(main())
