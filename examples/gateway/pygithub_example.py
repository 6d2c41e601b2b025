"""A GitHub client (PyGithub) through Till's gateway, with a Till token in place of a PAT.

    export GH_TILL_TOKEN=$(till mint github --allow 'GET /repos/acme/**' \\
        --allow 'GET /repositories/*/issues' --uses 10)
    export GITHUB_BASE_URL=http://127.0.0.1:8719/proxy/github
    python pygithub_example.py  # not "github.py": that name would hide the github package

GitHub clients send `Authorization: token <key>`; Till reads the token there and injects the real one.
GitHub's answers name api.github.com in their links (`url` fields, the `Link` header's next page);
the gateway rewrites those to itself, so PyGithub's next request comes back through Till too.
GitHub's next-page links name a repository by its id (`/repositories/ID/issues`), hence the second
rule. The github preset's ceiling is read-only (`GET /**`); widen it in till.toml for writes.
"""
import os

from github import Auth, Github

gh = Github(base_url=os.environ["GITHUB_BASE_URL"], auth=Auth.Token(os.environ["GH_TILL_TOKEN"]))
repo = gh.get_repo("acme/till")
for issue in repo.get_issues(state="open")[:5]:
    print(issue.number, issue.title)
