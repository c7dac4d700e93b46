"""nox sessions: tests, lint (ruff), types (mypy). CPU torch is installed first so pip never pulls CUDA."""

import nox

nox.options.sessions = ["tests", "lint", "types"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, extras: str) -> None:
    session.install("torch==2.13.0", "--extra-index-url", "https://download.pytorch.org/whl/cpu")
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session, "test")
    session.run("pytest", "-q", "-n", "auto", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "phi3tune", "tests", "examples", "noxfile.py")


@nox.session
def types(session: nox.Session) -> None:
    _install(session, "dev")
    session.run("mypy")
