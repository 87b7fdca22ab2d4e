"""PII scrubbing: planted e-mails, phones and IPs replaced; code look-alikes kept."""

from collections import Counter

import pytest

from lmx.data.pii import scrub_pii


@pytest.mark.parametrize("pii,kind,token", [
    ("jane.doe+news@mail.example.co.uk", "email", "<EMAIL>"),
    ("barry@python.org", "email", "<EMAIL>"),
    ("192.168.1.20", "ipv4", "<IP>"),
    ("8.8.8.8", "ipv4", "<IP>"),
    ("2001:db8:85a3::8a2e:370:7334", "ipv6", "<IP>"),
    ("fe80:0:0:0:202:b3ff:fe1e:8329", "ipv6", "<IP>"),
    ("(555) 123-4567", "phone", "<PHONE>"),
    ("555-123-4567", "phone", "<PHONE>"),
    ("+44 20 7946 0958", "phone", "<PHONE>"),
    ("+49-30-1234-5678", "phone", "<PHONE>"),
])
def test_planted_pii_scrubbed(pii, kind, token):
  counts = Counter()
  out = scrub_pii(f"Contact: {pii}, thanks.", counts)
  assert out == f"Contact: {token}, thanks."
  assert counts == Counter({kind: 1})


@pytest.mark.parametrize("text", [
    "Python 3.11.7 was released",
    "requires numpy>=1.26.4.0rc1",
    "version = '1.2.3.4.5'",
    "x[1::2] and y[::3]",
    "std::vector<int> v;",
    "meeting at 12:30:45 today",
    "date 2024-01-15, id 1234567890",
    "@property\ndef name(self): return self._name",
    "a @ b.T  # matmul",
    "0xdeadbeef 3.14159 1e-10",
    "ratio 999.999.999.999 is not an ip",
])
def test_code_lookalikes_kept(text):
  counts = Counter()
  assert scrub_pii(text, counts) == text
  assert not counts


def test_counts_accumulate_over_documents():
  counts = Counter()
  scrub_pii("a@b.com and c@d.org at 10.0.0.1", counts)
  scrub_pii("call 555.123.4567", counts)
  assert counts == Counter({"email": 2, "ipv4": 1, "phone": 1})
