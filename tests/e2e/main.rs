mod core;
mod limits;
mod loading;
mod process;
mod stress;
mod support;
