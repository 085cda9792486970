"""Imported once by the fork server of tests.harness, before any rank is forked: what every
rank would otherwise do again (read the default corpus, 0.3 s each) is then in memory already."""

from paratrain.data import load_corpus

load_corpus()
