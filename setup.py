"Build the package from settings.ini (nbdev 2 layout): metadata, requirements and console scripts live there."
from configparser import ConfigParser
from setuptools import setup, find_packages

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
split = lambda key: c.get(key, '').split()
# console_scripts entries are written `name=module:func`, one per whitespace-separated item
scripts = [s for s in c.get('console_scripts', '').split() if s]

setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    author=c['author'], author_email=c['author_email'], license='Apache-2.0', url=c['git_url'],
    keywords=c['keywords'], python_requires='>=' + c['min_python'],
    packages=find_packages(include=[c['lib_path'], c['lib_path'] + '.*']), include_package_data=True,
    install_requires=split('requirements'), extras_require={'dev': split('dev_requirements'), 'cluster': split('cluster_requirements')},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    zip_safe=False)
