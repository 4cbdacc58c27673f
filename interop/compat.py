"""Import shims that let the 2020 releases import on Python 3.11, without editing Synapse.

Synapse 1.13.0's ``synapse/util/stringutils.py`` does ``from collections import Iterable``;
Python 3.10 removed those aliases. Putting them back on the ``collections`` module before
Synapse is imported is enough. Importing this module has no other effect.
"""

import collections
import collections.abc

for _name in collections.abc.__all__:
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))
