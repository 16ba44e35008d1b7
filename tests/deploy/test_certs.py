"""Tests for deploy.certs / ``fedadapt certs``: chain verifies, SANs present, keys load."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (load_pem_private_key,
                                                          load_ssh_private_key,
                                                          load_ssh_public_key)

from fedadapt.deploy.certs import generate
import argparse

from fedadapt import cmd_certs


def test_chain_verifies_and_sans(tmp_path):
    p = generate(tmp_path, ("a", "b"), ("localhost", "127.0.0.1", "superlink"))
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(p.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()


def test_other_ca_does_not_verify(tmp_path):
    p1 = generate(tmp_path / "1", ("a",))
    p2 = generate(tmp_path / "2", ("a",))
    srv = x509.load_pem_x509_certificate(p1.server_cert.read_bytes())
    other = x509.load_pem_x509_certificate(p2.ca_cert.read_bytes())
    with pytest.raises(Exception):
        srv.verify_directly_issued_by(other)


def test_site_keys_in_flower_format(tmp_path):
    p = generate(tmp_path, ("a", "b", "c"))
    assert set(p.site_keys) == {"a", "b", "c"}
    pubs = set()
    for priv, pub in p.site_keys.values():
        k = load_ssh_private_key(priv.read_bytes(), None)  # what flower-supernode does
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        pk = load_ssh_public_key(pub.read_bytes())  # what flwr supernode register does
        assert isinstance(pk, ec.EllipticCurvePublicKey)
        assert pk.public_numbers() == k.public_key().public_numbers()
        pubs.add(pub.read_bytes())
    assert len(pubs) == 3


@pytest.mark.parametrize("sites", [(), ("a", "a"), ("bad name",)])
def test_bad_sites_rejected(tmp_path, sites):
    with pytest.raises(ValueError, match="sites"):
        generate(tmp_path, sites)


def _main(argv):
    parser = argparse.ArgumentParser()
    cmd_certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path, capsys):
    assert _main(["certs", str(tmp_path / "c"), "--sites", "x,y", "--san", "example.org"]) == 0
    srv = x509.load_pem_x509_certificate((tmp_path / "c" / "superlink.pem").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.org"]
    assert (tmp_path / "c" / "sites" / "y" / "auth.pub").exists()
