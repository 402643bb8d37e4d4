"""Shipped hardware profiles (TOML). A package only so that the files install as
package data under offload.profiles; see offload/profile.py and README.md here."""
