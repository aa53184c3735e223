"""Package discovery only; metadata lives in pyproject.toml.

The top-level folders `kernels/`, `export/` and `client/` install as `flashportrait.kernels`,
`flashportrait.export` and `flashportrait.client` (ARCHITECTURE.md section 2), which the static
`packages.find` table cannot express together with the folder mapping.
"""

from setuptools import find_packages, setup

MAPPED = {
    "kernels": "flashportrait.kernels",
    "export": "flashportrait.export",
    "client": "flashportrait.client",
}

packages = find_packages(include=["flashportrait", "flashportrait.*"])
package_dir = {}
for folder, name in MAPPED.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
