"""PII in international text: phone formats of CN, US, GB, DE, IN, JP, FR (national and +CC),
e-mails and IPs next to Chinese characters, PRC ID numbers; code look-alikes kept."""

from collections import Counter

import pytest

from lmx.data.pii import PiiConfig, scrub_pii, valid_cn_id

PHONES = [
    # CN mobile and Beijing / Shanghai landlines
    "13812345678", "138 1234 5678", "138-1234-5678", "+86 138 1234 5678", "+8613812345678",
    "0086 138 1234 5678", "010-6552-9981", "010-65529981", "(010) 6552 9981", "+86 10 6552 9981",
    "021-6123-4567",
    # US
    "(202) 555-0143", "202-555-0143", "202.555.0143", "1-202-555-0143", "+1 202 555 0143",
    "+1 (202) 555-0143",
    # UK
    "020 7946 0958", "+44 20 7946 0958", "+44 (0)20 7946 0958", "07911 123456",
    "+44 7911 123456",
    # DE
    "030 12345678", "030 1234 5678", "(030) 12345678", "+49 30 12345678", "+49-30-1234-5678",
    "0170 1234567",
    # IN
    "+91 98765 43210", "98765 43210", "022 2345 6789", "+91 22 2345 6789",
    # JP
    "03-1234-5678", "090-1234-5678", "+81 3-1234-5678", "+81 90 1234 5678",
    # FR
    "01 23 45 67 89", "+33 1 23 45 67 89",
]


@pytest.mark.parametrize("phone", PHONES)
@pytest.mark.parametrize("template", ["Contact: {}, thanks.", "联系电话：{}。", "电话{}转分机"])
def test_phone_formats_scrubbed(phone, template):
  counts = Counter()
  assert scrub_pii(template.format(phone), counts) == template.format("<PHONE>")
  assert counts == Counter({"phone": 1})


@pytest.mark.parametrize("text,out,kinds", [
    ("邮箱li.na_88@example.org，座机010-6552-9981", "邮箱<EMAIL>，座机<PHONE>",
     {"email": 1, "phone": 1}),
    ("请联系 josé.garcía@example.es 或 wang@example.cn。", "请联系 <EMAIL> 或 <EMAIL>。",
     {"email": 2}),
    ("服务器192.168.1.20上，IPv6 地址2001:db8::8a2e:370:7334。",
     "服务器<IP>上，IPv6 地址<IP>。", {"ipv4": 1, "ipv6": 1}),
    ("call 010-6552-9981 2024 or 13912345678 today", "call <PHONE> 2024 or <PHONE> today",
     {"phone": 2}),
])
def test_mixed_script_context(text, out, kinds):
  counts = Counter()
  assert scrub_pii(text, counts) == out
  assert counts == Counter(kinds)


@pytest.mark.parametrize("text", [
    # versions
    "Python 3.11.7", "build 10.0.19041.1234", "numpy==1.26.4", "v1.2.3-rc.4",
    # dates and times
    "2024-01-15", "15.01.2024", "2024/01/15", "'01-01-1980 25:00:00'", "2024 01 15",
    "12:30:45", "T08:15:30Z",
    # slices
    "x[1::2]", "a[10:20:2]", "buf[1024:2048]",
    # hex literals
    "0xDEADBEEF", "0x13812345678", "0x7fffffffffffffff",
    # long integers and digit strings
    "INT_MAX = 2147483647", "1 << 32 == 4294967296", "2**53 + 1 == 9007199254740993",
    "18446744073709551615", "ts = 1700000000", "id 1234567890", "DIGITS = '0123456789'",
    "f(4386268800)", "range(10000000)",
    # floats and tables of numbers
    "pi = 3.14159265358979", "1234.5678", "6.02214076e23", "lon = 138.12345678", "06.12345678",
    "sizes 1024 2048 4096 8192", "0 1 2 3 4 5 6 7 8 9", "1 000 000", "shape 2048 4096",
    "strftime -> '01 02 03 000004'", "13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28",
    "part no 33471-90901",
    # identifiers that only look like numbers
    "ISBN 978-3-16-148410-0", "port 8080 and 443", "223 3000234 <45223423@example>",
])
def test_code_lookalikes_kept(text):
  counts = Counter()
  assert scrub_pii(text, counts) == text
  assert not counts


def test_phone_regions_configure_national_formats():
  us_only = PiiConfig(phone_regions=("US",))
  counts = Counter()
  text = "Beijing 010-6552-9981, intl +86 10 6552 9981, DC (202) 555-0143"
  # National Chinese format needs CN; +CC numbers are found for every country.
  assert (scrub_pii(text, counts, us_only)
          == "Beijing 010-6552-9981, intl <PHONE>, DC <PHONE>")
  assert scrub_pii("010-6552-9981", Counter(), PiiConfig()) == "<PHONE>"
  with pytest.raises(ValueError, match="pii_rules.phone_regions"):
    PiiConfig(phone_regions=("CN", "XX")).validate()


def test_prc_resident_id_checksum():
  # The GB 11643-1999 example: born 1949-12-31, check character X.
  good = "11010519491231002X"
  assert valid_cn_id(good) and valid_cn_id(good.lower())
  assert not valid_cn_id("110105194912310021")  # wrong check character
  assert not valid_cn_id("110105194902300027")  # Feb 30
  on = PiiConfig(national_ids=True)
  counts = Counter()
  assert scrub_pii(f"身份证号{good}，电话13812345678", counts, on) == "身份证号<ID>，电话<PHONE>"
  assert counts == Counter({"national_id": 1, "phone": 1})
  assert scrub_pii("身份证号110105194912310021", Counter(), on) == "身份证号110105194912310021"
  assert scrub_pii(good, Counter()) == good  # off by default
