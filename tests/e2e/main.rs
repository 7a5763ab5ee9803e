mod core;
mod limits;
mod loading;
mod process;
mod support;
