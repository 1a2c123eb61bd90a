"""Helpers shared by several test modules."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest

from distac.pipeline.params import ConfigError, parse_params

MINIMAL_PARAMS = {"tasks": [{"name": "cola"}, {"name": "mrpc"}],
                  "merge": {"methods": [{"name": "task_arithmetic"}]}}


def params_with(**sections) -> dict:
    """The minimal valid params with whole sections replaced."""
    data = copy.deepcopy(MINIMAL_PARAMS)
    data.update(sections)
    return data


def params_error(data) -> str:
    """The ConfigError message ``data`` gets."""
    with pytest.raises(ConfigError) as caught:
        parse_params(data)
    return str(caught.value)


class CountingReader(Mapping):
    """A real checkpoint reader that counts the tensors read through it."""

    def __init__(self, reader):
        self.reader, self.reads = reader, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.reader[key]

    def __iter__(self):
        return iter(self.reader)

    def __len__(self):
        return len(self.reader)

    def __contains__(self, key):  # Mapping's default would read the tensor
        return key in self.reader

    def shape(self, key):
        return self.reader.shape(key)

    def dtype(self, key):
        return self.reader.dtype(key)
