"""PII scrubbing: e-mail addresses, IP addresses, phone numbers and (optionally) national ID
numbers -> placeholder tokens.

Tuned against code, where most digit runs are not PII, and against CJK text, where nothing
separates an address from the words around it (`\\w` matches Han characters, so the boundaries
here are spelled out in ASCII):
- E-mails: a local part of ASCII or Latin letters, digits and `._%+-`, a dotted domain and a
  2..24-letter TLD.
- IPv4 needs exactly four dot-separated octets (each 0..255) not glued to more digits or dots,
  so version strings (`3.11.7`, `1.2.3.4.5`) stay.
- IPv6 candidates are validated with `ipaddress` and need >= 3 non-empty groups, so slices
  (`x[1::2]`), C++ scopes (`std::vector`) and clock times (`12:30:45`) stay. The price: very
  short forms such as `fe80::1` are kept too.
- Phone numbers: a regex proposes digit runs joined by single spaces, dashes, dots or
  parentheses (optionally `+` first); Google's libphonenumber (`phonenumbers`) decides.
  `+CC ...` and `00CC ...` must be valid numbers of that country. National forms must be valid
  in one of `PiiConfig.phone_regions` AND written as that region writes them: the digits of
  libphonenumber's national format, trunk 0 included, with breaks where that format has
  them (or inside the subscriber number). National numbering plans accept most digit strings
  somewhere (`2048 4096` is a valid German number), so this is what keeps code intact. Also
  refused: dates (`2024-01-15`, `15.01.2024`, `01-01-1980 25:00`), dotted runs with fewer
  than three groups or a one-digit group (decimals, versions), and bare digit runs unless
  they are mobile numbers written in full: `13812345678` is a phone; `2147483647`,
  `4294967296`, `1700000000`, `0123456789` are not. North-American numbers count only in their
  3-3-4 layout (`(202) 555-0143`, `1-202-555-0143`), and there the right length suffices:
  fiction uses the unassigned 555 area code (and `256 512 1024` is a phone, as before).
  Indian mobiles may drop the trunk 0 (`98765 43210`).
  NOTE: what this misses on purpose: a bare landline (`01065529981`), a bare Indian mobile
  (`9876543210`), slash-separated German numbers (`030/12345678`), full-width digits.
- National IDs (`PiiConfig.national_ids`, off by default): the 18-character PRC resident
  identity number (GB 11643-1999: region code, a real birth date, ISO 7064 MOD 11-2 check
  character) -> `<ID>`.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
from collections import Counter

import phonenumbers

EMAIL_TOKEN, PHONE_TOKEN, IP_TOKEN, ID_TOKEN = "<EMAIL>", "<PHONE>", "<IP>", "<ID>"


@dataclasses.dataclass(frozen=True)
class PiiConfig:
  # ISO 3166 regions whose national phone formats are recognised; international (+CC)
  # numbers of every country are found regardless.
  phone_regions: tuple[str, ...] = ("CN", "US", "GB", "DE", "FR", "IN", "JP")
  national_ids: bool = False  # PRC resident ID numbers (checksum-validated) -> <ID>.

  def validate(self) -> "PiiConfig":
    known = phonenumbers.SUPPORTED_REGIONS
    bad = [r for r in self.phone_regions if r not in known]
    if bad or not isinstance(self.phone_regions, tuple):
      raise ValueError(f"Invalid config: `prepare.pii_rules.phone_regions` has "
                       f"{bad or self.phone_regions!r}; it must be a list of ISO 3166 region "
                       "codes that libphonenumber knows (e.g. 'CN', 'US', 'GB').")
    return self


# Local part: ASCII plus Latin-1/Extended letters (`josé@...`), never CJK -- `邮箱li.na@x.org`
# must not swallow the Chinese word before it.
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9\u00C0-\u024F._%+-])[A-Za-z0-9\u00C0-\u024F][A-Za-z0-9\u00C0-\u024F._%+-]*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![A-Za-z0-9_.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?![A-Za-z0-9_])")
_IPV6_CAND_RE = re.compile(
    r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![A-Za-z0-9_:])")
# Candidate phone runs (7+ digits); `is_phone` decides, `_phone_spans` may split them.
_PHONE_CAND_RE = re.compile(
    r"(?<![A-Za-z0-9_+.\-/])(?:\+ ?)?\(?\d(?:[ .\-]?\(?\d|\)[ .\-]?\d){5,25}"
    r"(?![A-Za-z0-9_]|[.\-/]?\d)")
_DATE_RE = re.compile(r"\d{4}([-./ ])\d{1,2}\1\d{1,2}|\d{1,2}([-./ ])\d{1,2}\2\d{2,4}")
# A date with a 4-digit year anywhere in a candidate (`01-01-1980 25` is a date and an hour).
_YEAR_DATE_RE = re.compile(r"(?<!\d)(?:(?:19|20)\d\d([-./ ])[01]?\d\1[0-3]?\d"
                           r"|[0-3]?\d([-./])[01]?\d\2(?:19|20)\d\d)(?!\d)")
_NANP_RE = re.compile(r"(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}")
_DIGIT_RE = re.compile(r"\d")
_DIGIT_GROUPS_RE = re.compile(r"\d+")
_CN_ID_RE = re.compile(
    r"(?<![A-Za-z0-9_])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    r"\d{3}[\dXx](?![A-Za-z0-9_])")
_CN_ID_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]
# Regions whose mobiles are customarily written without the trunk 0 (`98765 43210`).
_TRUNK_DROPPED_MOBILE = frozenset({"IN"})


def _valid_ipv6(s: str) -> bool:
  if sum(1 for g in s.split(":") if g) < 3:
    return False
  try:
    ipaddress.IPv6Address(s)
  except ValueError:
    return False
  return True


def valid_cn_id(s: str) -> bool:
  """PRC resident ID: a real birth date and the ISO 7064 MOD 11-2 check character."""
  try:
    datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
  except ValueError:
    return False
  total = sum(int(c) * w for c, w in zip(s[:17], _CN_ID_WEIGHTS))
  return "10X98765432"[total % 11] == s[17].upper()


def _looks_like_other_number(s: str) -> bool:
  """Dates, decimals and version strings that libphonenumber would accept somewhere."""
  if _DATE_RE.fullmatch(s) or _YEAR_DATE_RE.search(s):
    return True
  if "." in s:
    groups = re.split(r"[ .\-()]+", s.strip("+()"))
    if s.count(".") < 2 or min(len(g) for g in groups if g) < 2:
      return True
  return False


def _cuts(groups: list[str]) -> set[int]:
  """Digit offsets where a run of digit groups is split (e.g. ['010', '6552'] -> {3})."""
  out, n = set(), 0
  for g in groups[:-1]:
    n += len(g)
    out.add(n)
  return out


def _written_like(s: str, national: str, shift: int) -> bool:
  """Whether `s` groups its digits as the region does (`national` = libphonenumber's national
  format): every break in `s` is a break of the national format, or falls inside its last
  group (the subscriber number, which people split freely: `030 1234 5678`). `shift` = 1 when
  `s` omits the national format's trunk 0. Refuses `0 1 2 3 4 5 6 7 8 9` (FR is `01 23 ...`)
  and `33471-90901` (US is `(334) 719-0901`)."""
  fmt = _DIGIT_GROUPS_RE.findall(national)
  allowed = {c - shift for c in _cuts(fmt)}
  last = sum(map(len, fmt[:-1])) - shift
  return all(c in allowed or c > last for c in _cuts(_DIGIT_GROUPS_RE.findall(s)))


def is_phone(s: str, regions: tuple[str, ...]) -> bool:
  """Whether the candidate string `s` is a phone number (see the module docstring)."""
  digits = "".join(_DIGIT_RE.findall(s))
  if s.count("(") != s.count(")"):
    return False
  if not 7 <= len(digits) <= 17 or _looks_like_other_number(s):  # 17: 00 + CC + 15 at most
    return False
  if s.startswith("+"):
    try:
      return phonenumbers.is_valid_number(phonenumbers.parse(s, None))
    except phonenumbers.NumberParseException:
      return False
  if "US" in regions and _NANP_RE.fullmatch(s):
    # North-American layout: accepted when merely possible (ten digits), because fiction and
    # documentation use the unassigned 555 area code: `(555) 123-4567` is still a phone.
    return phonenumbers.is_possible_number(phonenumbers.parse(s, "US"))
  bare = s.isdigit()
  for region in regions:
    if region == "US":  # only in the 3-3-4 layout above: `223 3000234` is an NNTP reply
      continue
    try:
      n = phonenumbers.parse(s, region, keep_raw_input=True)
    except phonenumbers.NumberParseException:
      continue
    if not phonenumbers.is_valid_number(n):
      continue
    if n.country_code_source == phonenumbers.CountryCodeSource.FROM_NUMBER_WITH_IDD:
      return True  # 0086 ..., 0044 ...: an international number dialled from abroad
    # Written as the region writes it: the digits of libphonenumber's national format, trunk
    # prefix included (CN landlines, GB, DE, FR, JP: 0...), grouped compatibly. Without this,
    # `2048 4096` is a valid German number and `1700000000` a German mobile.
    national = phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.NATIONAL)
    nat_digits = "".join(_DIGIT_RE.findall(national))
    mobile = phonenumbers.number_type(n) == phonenumbers.PhoneNumberType.MOBILE
    if bare:  # a bare digit run is a phone only as a mobile number (13812345678)
      if mobile and nat_digits == digits:
        return True
    elif nat_digits == digits and _written_like(s, national, 0):
      return True
    elif (region in _TRUNK_DROPPED_MOBILE and mobile and nat_digits == "0" + digits
          and _written_like(s, national, 1)):
      return True
  return False


def _phone_spans(text: str, regions: tuple[str, ...]):
  """(start, end) of phone numbers. A candidate that is not one phone and has dashes, dots or
  parentheses is retried as its space-separated sub-runs (longest first), so a year or a
  second number after a space does not hide `010-6552-9981`. Space-only runs are never split:
  they are tables of numbers far more often than phones."""
  for m in _PHONE_CAND_RE.finditer(text):
    start, cand = m.start(), m.group()
    if cand.startswith("(") and ")" not in cand:  # `f(4386268800)`: a call, not an area code
      start, cand = start + 1, cand[1:]
    if is_phone(cand, regions):
      yield start, m.end()
      continue
    if not any(c in cand for c in "-.()"):
      continue
    chunks = [(c.start() + start, c.end() + start) for c in re.finditer(r"\S+", cand)]
    i = 0
    while i < len(chunks):
      for j in range(len(chunks), i, -1):
        a, b = chunks[i][0], chunks[j - 1][1]
        if is_phone(text[a:b], regions):
          yield a, b
          i = j
          break
      else:
        # A failed `+CC ...` is one invalid number, not a country code next to a national one.
        i = len(chunks) if text[chunks[i][0]] == "+" else i + 1


def scrub_pii(text: str, counts: Counter | None = None, cfg: PiiConfig | None = None) -> str:
  """Replace e-mails, IPs, phone numbers (and national IDs if enabled) by placeholder tokens;
  add to `counts` by kind (email, ipv4, ipv6, national_id, phone)."""
  counts = counts if counts is not None else Counter()
  cfg = cfg or PiiConfig()

  def sub(pattern, token, kind, s, check=None):
    def repl(m):
      if check is not None and not check(m.group(0)):
        return m.group(0)
      counts[kind] += 1
      return token
    return pattern.sub(repl, s)

  # E-mails first: their domains may contain digits that look like the other kinds; IDs
  # before phones: an ID's digits are never a phone, but a phone check would see 18 digits.
  text = sub(_EMAIL_RE, EMAIL_TOKEN, "email", text)
  text = sub(_IPV6_CAND_RE, IP_TOKEN, "ipv6", text, _valid_ipv6)
  text = sub(_IPV4_RE, IP_TOKEN, "ipv4", text)
  if cfg.national_ids:
    text = sub(_CN_ID_RE, ID_TOKEN, "national_id", text, valid_cn_id)
  spans = list(_phone_spans(text, cfg.phone_regions))
  if spans:
    counts["phone"] += len(spans)
    parts, last = [], 0
    for a, b in spans:
      parts += [text[last:a], PHONE_TOKEN]
      last = b
    text = "".join(parts) + text[last:]
  return text
