"""PII scrubbing: e-mail addresses, phone numbers and IP addresses -> placeholder tokens.

Regexes are tuned against code, where most digit runs are not PII:
- IPv4 needs exactly four dot-separated octets (each 0..255) not glued to more digits or
  dots, so version strings (`3.11.7`, `1.2.3.4.5`) stay.
- IPv6 candidates are validated with `ipaddress` and need >= 3 non-empty groups, so slices
  (`x[1::2]`), C++ scopes (`std::vector`) and clock times (`12:30:45`) stay. The price:
  very short forms such as `fe80::1` are kept too.
- Phone numbers need separators in a 3-3-4 (North American) or `+CC` international layout,
  so bare integers, dates (`2024-01-15`) and hex constants stay.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL_TOKEN, PHONE_TOKEN, IP_TOKEN = "<EMAIL>", "<PHONE>", "<IP>"

_EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?![\w])")
_IPV6_CAND_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE_RE = re.compile(
    r"(?<![\w+.-])(?:"
    r"(?:\+1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # (555) 123-4567, 555.123.4567
    r"|\+\d{1,3}[ .-]\d{1,4}(?:[ .-]\d{2,4}){2,4}"  # +44 20 7946 0958, +49-30-1234-5678
    r")(?![\w.-]?\d)")


def _valid_ipv6(s: str) -> bool:
  if sum(1 for g in s.split(":") if g) < 3:
    return False
  try:
    ipaddress.IPv6Address(s)
  except ValueError:
    return False
  return True


def scrub_pii(text: str, counts: Counter | None = None) -> str:
  """Replace e-mails, IPs and phone numbers by placeholder tokens; add to `counts` by kind."""
  counts = counts if counts is not None else Counter()

  def sub(pattern, token, kind, s, check=None):
    def repl(m):
      if check is not None and not check(m.group(0)):
        return m.group(0)
      counts[kind] += 1
      return token
    return pattern.sub(repl, s)

  # E-mails first: their domains may contain digits that look like the other kinds.
  text = sub(_EMAIL_RE, EMAIL_TOKEN, "email", text)
  text = sub(_IPV6_CAND_RE, IP_TOKEN, "ipv6", text, _valid_ipv6)
  text = sub(_IPV4_RE, IP_TOKEN, "ipv4", text)
  text = sub(_PHONE_RE, PHONE_TOKEN, "phone", text)
  return text
