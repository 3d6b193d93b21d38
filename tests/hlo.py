"""Reading compiled HLO text in tests."""

import re

_DEF = re.compile(r'%([\w.-]+) = (\w+)\[')
_DOT = re.compile(r'= (\w+)\[[\d,]*\]\S* dot\(%([\w.-]+), %([\w.-]+)\)')


def dot_dtypes(hlo_text):
  """[(lhs dtype, rhs dtype, result dtype)] of every dot (instruction names are unique in a
  module, so operands resolve through their definitions, fused computations' parameters too)."""
  dtype = dict(_DEF.findall(hlo_text))
  return [(dtype[a], dtype[b], out) for out, a, b in _DOT.findall(hlo_text)]
