"""Issue 9's "Done when", end to end: a new user's real Django app in worktrees of one repo,
in schema, database (template) and container mode, on a real Postgres server and Docker engine.

Main's .env holds DATABASE_URL (main's own shop_dev) and PORT=8000, as it would for any Django
app; devd copies that file into each worktree. Migrations diverge per branch, `manage.py test`
runs in two worktrees at once, template mode restores rows after gc, and when the Postgres step
is forced to fail, the app in that worktree must fail loudly instead of reaching main's data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Devd, Repo, run_git
from djangosupport import (
    BRANCH_B,
    FIXTURE,
    active,
    add_worktree,
    closed_port,
    commit_in,
    files,
    make_main,
    manage,
    manage_ok,
    manage_together,
    snapshot,
    with_port,
)
from dotenv import dotenv_values
from pgsupport import (
    IMAGE,
    env_of,
    image_client,
    query,
    remove_owned,
    start_server,
    with_postgres,
)

pytestmark = [pytest.mark.postgres]
B_MIGRATION = ("catalog", "0002_product_sku_review")
# What a template may hold besides tables, and a migration's ALTER of each (issue 9, item 2).
TEMPLATE_OBJECTS = """
CREATE EXTENSION pgcrypto;
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN price AS numeric(10, 2) CHECK (VALUE >= 0);
CREATE SEQUENCE invoice_no START 1000;
CREATE FUNCTION product_count() RETURNS bigint LANGUAGE sql
    AS 'SELECT count(*) FROM catalog_product';
CREATE PROCEDURE bump_invoice() LANGUAGE sql AS 'SELECT nextval(''invoice_no'')';
CREATE VIEW product_titles AS SELECT title FROM catalog_product;
"""
MIGRATION_ALTERS = [
    "ALTER TYPE mood ADD VALUE 'meh'",
    "ALTER DOMAIN price SET DEFAULT 0",
    "ALTER SEQUENCE invoice_no RESTART WITH 5000",
    "CREATE OR REPLACE FUNCTION product_count() RETURNS bigint LANGUAGE sql "
    "AS 'SELECT count(*) + 0 FROM catalog_product'",
    "CREATE OR REPLACE PROCEDURE bump_invoice() LANGUAGE sql AS 'SELECT 1'",
    "CREATE OR REPLACE VIEW product_titles AS SELECT title, id FROM catalog_product",
    "CALL bump_invoice()",
]
OWNERS = """
SELECT proname, pg_get_userbyid(proowner) FROM pg_proc
 WHERE proname IN ('product_count', 'bump_invoice')
UNION ALL SELECT typname, pg_get_userbyid(typowner) FROM pg_type WHERE typname IN ('mood', 'price')
UNION ALL SELECT relname, pg_get_userbyid(relowner) FROM pg_class
 WHERE relname IN ('product_titles', 'invoice_no', 'catalog_product', 'django_migrations')
"""


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    yield from start_server()


@pytest.fixture
def app_repo(make_repo: Callable[..., Repo]) -> Repo:
    """A repo holding the Django app on main (whose devd.toml each test sets)."""
    repo = make_repo()
    repo.commit(files(FIXTURE) | {".gitignore": ".env\n.env.local\n__pycache__/\n"}, "Django app")
    return repo


@pytest.fixture
def start_devd(devd_home: Devd) -> Iterator[Callable[[str | None], Devd]]:
    """Start the daemon with an admin URL of the test's choosing; stop it cleanly after."""
    def start(admin_url: str | None) -> Devd:
        if admin_url:
            devd_home.env["DEVD_POSTGRES_URL"] = admin_url
        devd_home.start()
        return devd_home
    yield start
    if devd_home.proc is not None:
        assert devd_home.stop() == 0, devd_home.log()


def three_worktrees(repo: Repo) -> tuple[Path, Path, Path]:
    """A on main's migrations, B adds a column and a model, C branches off B (for failures).
    B's long name leaves a framework's `test_` prefix no room unless devd made some."""
    a = add_worktree(repo, "shop-a", "feat/a")
    b = add_worktree(repo, "shop-b-reviews-and-skus-for-the-spring-catalogue-launch", "feat/b")
    commit_in(b, files(BRANCH_B), "Reviews and SKUs")
    return a, b, add_worktree(repo, "shop-c", "feat/c", "feat/b")


def provision_two(devd: Devd, repo: Repo, main_url: str
                  ) -> tuple[Path, Path, Path, dict[str, str], dict[str, str]]:
    """Three worktrees, A and B provisioned: their paths and devd's env for A and B."""
    a, b, c = three_worktrees(repo)
    for tree in (a, b):
        devd.run("provision", str(tree), timeout=180)
    return a, b, c, devds_env(devd, a, main_url), devds_env(devd, b, main_url)


def devds_env(devd: Devd, tree: Path, main_url: str) -> dict[str, str]:
    """devd's env for a worktree, once python-dotenv reads it and no other line defines it."""
    env = env_of(devd, tree)
    assert env["DATABASE_URL"] != main_url
    assert dotenv_values(tree / ".env")["DATABASE_URL"] == env["DATABASE_URL"]
    text = (tree / ".env").read_text()
    # Main's copied lines must not stay active beside devd's block (first-wins loaders).
    assert active(text, "DATABASE_URL") == [env["DATABASE_URL"]], text
    assert active(text, "PORT") == [env["PORT"]], text
    return env


def applied(url: str) -> set[tuple[str, str]]:
    return set(query(url, "SELECT app, name FROM django_migrations"))


def migrations_diverge(a: Path, b: Path, env_a: dict[str, str], env_b: dict[str, str],
                       main_url: str) -> None:
    """migrate in A and B lands in each worktree's own database; main's stays as it was."""
    before = snapshot(main_url)
    outputs = [manage_ok(tree, "migrate", "--noinput") for tree in (a, b)]
    assert snapshot(main_url) == before
    assert "Applying catalog.0002_product_sku_review" in outputs[1]
    assert B_MIGRATION in applied(env_b["DATABASE_URL"])
    assert B_MIGRATION not in applied(env_a["DATABASE_URL"])
    assert query(env_b["DATABASE_URL"], "SELECT count(*) FROM catalog_review") == [(0,)]
    with pytest.raises(psycopg.errors.UndefinedColumn):
        query(env_a["DATABASE_URL"], "SELECT sku FROM catalog_product")


def runners_pass_together(a: Path, b: Path, main_url: str) -> None:
    """Django's own test runner in two worktrees at once, with no grant by hand."""
    before = snapshot(main_url)
    runs = manage_together([a, b], "test", "--noinput")
    for tree, (code, output) in zip((a, b), runs, strict=True):
        assert code == 0 and "OK" in output, f"manage.py test in {tree}:\n{output}"
    assert snapshot(main_url) == before


def own_test_databases(env_a: dict[str, str], env_b: dict[str, str]) -> None:
    """CREATEDB for the worktree role and a test database name per worktree (env contract)."""
    for env in (env_a, env_b):
        assert query(env["DATABASE_URL"], "SELECT rolcreatedb FROM pg_roles "
                                          "WHERE rolname = current_user") == [(True,)]
        assert 0 < len(env["DEVD_TEST_DATABASE"].encode()) <= 63
    assert env_a["DEVD_TEST_DATABASE"] != env_b["DEVD_TEST_DATABASE"]


def fails_loudly(devd: Devd, tree: Path, main_url: str, why: str,
                 env: dict[str, str] | None = None) -> None:
    """A failed Postgres step: provision says so, the app cannot run, main's data is intact."""
    before = snapshot(main_url)
    failed = devd.run("provision", str(tree), check=False, env=env, timeout=180)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    entry = devd.worktree(tree)
    [pg] = [r for r in entry["resources"] if r["kind"] == "postgres"]
    assert pg["state"] == "failed" and re.search(why, pg["detail"]), entry
    assert entry["state"] == "failed" and re.search(why, entry["error"] or ""), entry
    migrate = manage(tree, "migrate", "--noinput")
    assert snapshot(main_url) == before, f"main's database changed:\n{migrate.stdout}"
    assert migrate.returncode != 0, f"migrate ran in {tree} without its database:\n" \
                                    f"{migrate.stdout}"
    assert main_url not in active((tree / ".env").read_text(), "DATABASE_URL")
    assert dotenv_values(tree / ".env").get("DATABASE_URL") != main_url
    shown = devd.run("env", str(tree), "--format", "json", check=False)
    assert shown.returncode != 0 or main_url not in json.loads(shown.stdout).values()


def test_schema_mode(start_devd: Callable[[str | None], Devd], app_repo: Repo,
                     pg_url: str) -> None:
    """Schemas in main's own database, whose public holds main's tables (issue 9, item 3)."""
    main_url = make_main(app_repo, pg_url, "shop_dev_schema")
    with_postgres(app_repo, 'mode = "schema"\ncreatedb = true\n')
    devd = start_devd(main_url)
    a, b, c, env_a, env_b = provision_two(devd, app_repo, main_url)
    # A fresh schema has no tables: migrate must build them there, not find main's in public.
    assert "Applying catalog.0001_initial" in manage_ok(a, "migrate", "--noinput")
    assert query(env_a["DATABASE_URL"], "SELECT count(*) FROM catalog_product") == [(0,)]
    migrations_diverge(a, b, env_a, env_b, main_url)
    own_test_databases(env_a, env_b)
    runners_pass_together(a, b, main_url)
    fails_loudly(devd, c, main_url, "connect|refused",
                 env={"DEVD_POSTGRES_URL": with_port(main_url, closed_port())})


def test_database_mode_from_a_template(start_devd: Callable[[str | None], Devd],
                                       app_repo: Repo, pg_url: str) -> None:
    """Clones of main's shop_dev, which holds a function, a procedure, types, a view, a
    sequence and a trusted extension: migrations alter them, restore after gc brings rows back."""
    main_url = make_main(app_repo, pg_url, "shop_dev_tpl")
    query(main_url, TEMPLATE_OBJECTS)
    with_postgres(app_repo, 'mode = "database"\ntemplate = "shop_dev_tpl"\ncreatedb = true\n')
    devd = start_devd(pg_url)
    a, b, c, env_a, env_b = provision_two(devd, app_repo, main_url)
    assert query(env_a["DATABASE_URL"], "SELECT count(*) FROM catalog_product") == [(3,)]
    assert {owner for _, owner in query(env_a["DATABASE_URL"], OWNERS)} == {env_a["PGUSER"]}
    for statement in MIGRATION_ALTERS:
        query(env_a["DATABASE_URL"], statement)
    assert query(env_a["DATABASE_URL"], "SELECT length(digest('x', 'sha256'))") == [(32,)]
    migrations_diverge(a, b, env_a, env_b, main_url)
    own_test_databases(env_a, env_b)
    runners_pass_together(a, b, main_url)
    restore_after_gc(devd, app_repo, a, main_url)
    with psycopg.connect(main_url, application_name="held-by-main"):  # the template is busy
        fails_loudly(devd, c, main_url, "open connections")
    devd.run("provision", str(c))  # the session gone, the same worktree provisions
    devds_env(devd, c, main_url)
    assert "Applying catalog.0002_product_sku_review" in manage_ok(c, "migrate", "--noinput")
    assert B_MIGRATION not in applied(main_url)


def restore_after_gc(devd: Devd, repo: Repo, tree: Path, main_url: str) -> None:
    """Rows written in a clone survive `git worktree remove` + gc through the kept dump."""
    manage_ok(tree, "shell", "-c", "from catalog.models import Product; "
                                   "Product.objects.create(title='kept by the dump')")
    rows = query(env_of(devd, tree)["DATABASE_URL"], "SELECT id, title FROM catalog_product")
    run_git(repo.main, "worktree", "remove", "--force", str(tree))
    result = devd.json("gc", "--grace", "0")
    [released] = [w for w in result["worktrees"] if w["path"] == str(tree)]
    assert released["released"] and Path(released["dumps"][0]).stat().st_size > 0, released
    run_git(repo.main, "worktree", "add", "-q", str(tree), "feat/a")
    devd.run("provision", str(tree))
    url = devds_env(devd, tree, main_url)["DATABASE_URL"]
    assert query(url, "SELECT count(*) FROM catalog_product") == [(3,)]  # a fresh clone
    devd.run("restore", str(tree), timeout=120)
    assert sorted(query(url, "SELECT id, title FROM catalog_product")) == sorted(rows)
    assert query(url, "SELECT length(digest('x', 'sha256'))") == [(32,)]
    counted = manage_ok(tree, "shell", "-c", "from catalog.models import Product; "
                                             "print(Product.objects.count())")
    assert counted.split()[-1] == "4", counted


@pytest.fixture
def engine(devd_home: Devd) -> Iterator[Any]:
    """The Docker engine; afterwards every container and volume of this test's worktrees goes."""
    client = image_client()
    yield client
    if devd_home.proc is not None:
        remove_owned(client, {w["id"] for w in devd_home.status()["worktrees"]})


@pytest.mark.docker
def test_container_mode(start_devd: Callable[[str | None], Devd], app_repo: Repo,
                        pg_url: str, engine: Any) -> None:
    """A container per worktree; main's shop_dev lives on the shared server."""
    main_url = make_main(app_repo, pg_url, "shop_dev_ctr")
    with_postgres(app_repo, f'mode = "container"\nimage = "{IMAGE}"\ncreatedb = true\n')
    devd = start_devd(None)
    a, b, c, env_a, env_b = provision_two(devd, app_repo, main_url)
    migrations_diverge(a, b, env_a, env_b, main_url)
    runners_pass_together(a, b, main_url)
    # C never gets a container: its image cannot be had.
    (c / "devd.toml").write_text('[postgres]\nmode = "container"\n'
                                 'image = "devd-test.invalid/no-such-image:1"\n')
    fails_loudly(devd, c, main_url, "no-such-image")
